"""--learn-floor: what the workers imported after the fork, kept in the fleet's state
directory and imported into the floor at the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Events, MasterProcess, master_env
from fleets.lazy import STDLIB, UNFIT
from prefork.learned_floor import LearnedFloor, floor_file

REPORT = ("--report-imports-after", "0.3", "--log-level", "debug")
REPORTED = r"worker {} imported (\d+) modules after the fork"


def env_for(events: Events, runtime_dir: Path, tmp_path: Path) -> dict[str, str]:
    return master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path),
                      XDG_STATE_HOME=str(tmp_path / "state"))


def reports(events: Events, runtime_dir: Path) -> dict[str, dict | None]:
    result = subprocess.run([sys.executable, "-m", "prefork", "status", "--json"],
                            capture_output=True, text=True, timeout=30,
                            env=master_env(events, runtime_dir))
    assert result.returncode == 0, result.stderr
    return {w["label"]: w["imported_after_fork"] for w in json.loads(result.stdout)["workers"]}


def stop(master: MasterProcess) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_learn_floor_imports_what_the_workers_imported_at_the_next_start(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    env = env_for(events, runtime_dir, tmp_path)
    path = floor_file("lazy-mixed", {"XDG_STATE_HOME": str(tmp_path / "state")})
    first = start_master("fleets.lazy:mixed", "--learn-floor", *REPORT, env=env)
    first.wait_log(REPORTED.format("lazy"))
    learned = json.loads(path.read_text())
    assert set(STDLIB + UNFIT) <= set(learned["modules"]) and learned["left"] == {}
    stop(first)

    second = start_master("fleets.lazy:mixed", "--learn-floor", *REPORT, env=env)
    # The two unfit ones are left to the worker, named in one line; the rest is in the floor.
    left = second.wait_log(r"learned floor: left to the workers: (.*)").group(1)
    assert left == ("fleets.lazy_worker_only (ImportError: needs a worker's connection); "
            "fleets.lazy_threaded (starts a thread: lazy-flusher)")
    second.wait_log(REPORTED.format("lazy"))
    assert reports(events, runtime_dir)["lazy"]["modules"] == list(UNFIT)
    assert not second.log_matches(r"forking with")  # no thread in the master
    assert set(json.loads(path.read_text())["left"]) == set(UNFIT)
    stop(second)

    third = start_master("fleets.lazy:mixed", "--learn-floor", *REPORT, env=env)
    assert int(third.wait_log(r"learned floor: (\d+) modules imported").group(1)) >= len(
        STDLIB)
    third.wait_log(REPORTED.format("lazy"))
    assert not third.log_matches(r"left to the workers")  # not tried again
    assert reports(events, runtime_dir)["lazy"]["modules"] == list(UNFIT)
    stop(third)


def test_a_garbled_learned_floor_is_one_warning_and_is_written_afresh(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    path = floor_file("lazy", {"XDG_STATE_HOME": str(tmp_path / "state")})
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"modules": ["xml.dom.minidom", 7]}')
    master = start_master("fleets.lazy:fleet", "--learn-floor", *REPORT,
                          env=env_for(events, runtime_dir, tmp_path))
    master.wait_log(r"learned floor .*lazy.floor ignored: \"modules\" is not a list of "
                    r"module names; it will be written afresh")
    master.wait_log(REPORTED.format("lazy"))
    assert set(STDLIB) <= set(json.loads(path.read_text())["modules"])
    assert len(master.log_matches(r"learned floor")) == 1
    stop(master)


def test_floor_file_prefers_systemds_state_directory() -> None:
    assert floor_file("f", {"STATE_DIRECTORY": "/var/lib/prefork/f", "XDG_STATE_HOME": "/x"}
                      ) == Path("/var/lib/prefork/f/f.floor")
    assert floor_file("f", {"XDG_STATE_HOME": "/x"}) == Path("/x/prefork/f.floor")
    assert floor_file("f", {"HOME": "/home/u"}) == Path("/home/u/.local/state/prefork/f.floor")
    assert os.fspath(floor_file("f", {"XDG_STATE_HOME": "relative", "HOME": "/h"})) == (
        "/h/.local/state/prefork/f.floor")  # a relative one is ignored, as the spec says


def test_a_floor_file_someone_else_could_write_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its names are imported into the master: only a file that is ours, in a directory
    that is ours, neither writable by others, is believed (nor read through a symlink)."""
    path = tmp_path / "state" / "f.floor"
    path.parent.mkdir()
    path.write_text('{"modules": ["xml.dom.minidom"]}')
    assert LearnedFloor.load("f", path).modules == ["xml.dom.minidom"]
    path.chmod(0o666)
    assert LearnedFloor.load("f", path).modules == []
    path.chmod(0o600)
    path.parent.chmod(0o777)
    assert LearnedFloor.load("f", path).modules == []
    path.parent.chmod(0o700)
    elsewhere = tmp_path / "elsewhere.floor"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    assert LearnedFloor.load("f", path).modules == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].endswith("ignored: the file is writable by others (mode 666)")
    assert messages[1].endswith("ignored: its directory is writable by others (mode 777)")
    assert "unreadable (Too many levels of symbolic links)" in messages[2]


def test_saving_never_writes_through_a_planted_name(tmp_path: Path) -> None:
    path = tmp_path / "f.floor"
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / f".f.floor.{os.getpid()}").symlink_to(target)  # the temporary file's name
    floor = LearnedFloor("f", path)
    floor.add(["xml.dom.minidom"])  # saves: refused, one warning, the fleet goes on
    assert target.read_text() == "precious\n" and not path.exists()
