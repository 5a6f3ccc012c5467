"""A floor that sets up its own logging at import: its lines once in its format, prefork's
lines once in prefork's, and prefork never touches the root logger's handlers or level."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from conftest import Events, master_env

PREFORK_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[\d+\] (INFO|WARNING) ")
APP_LINE = re.compile(r"^APP (\S+) (\S+) (.*)$")


@pytest.mark.parametrize("how", ["basic", "handler", "dictconfig"])
def test_each_line_once_in_its_own_format(start_master, events: Events, runtime_dir: Path,
                                          tmp_path: Path, how: str) -> None:
    env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path), APP_LOGGING=how)
    master = start_master("fleets.app_floor:app", env=env)
    events.wait_kind("up")
    master.wait_log(r"worker chatty spawned")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0

    app_lines = [m.groups() for m in map(APP_LINE.match, master.lines) if m]
    # The application's own lines, once each, and nothing below its root level (WARNING):
    # prefork set no level on root.
    assert app_lines == [("app", "WARNING", "floor imported"),
                         ("app", "WARNING", "hello from the worker")]
    # prefork's lines, once each, in prefork's format only: none went through root.
    for event in ("worker chatty spawned", "stopping on SIGTERM", "stopped in"):
        lines = [line for line in master.lines if event in line]
        assert len(lines) == 1, (event, master.log)
        assert PREFORK_LINE.match(lines[0]), lines[0]
    assert "Traceback" not in master.log
