"""What workers import after the fork: reported to the master, shown by `prefork status`
with the --preload line that moves it into the floor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import Events, MasterProcess, master_env
from fleets.lazy import STDLIB
from prefork.after_fork import MAX_REPORT, encode_report, parse_report, preload_names

REPORT = ("--report-imports-after", "0.3", "--log-level", "debug")
REPORTED = r"worker {} imported (\d+) modules after the fork"


def status(events: Events, runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "prefork", "status", *args],
                            capture_output=True, text=True, timeout=30,
                            env=master_env(events, runtime_dir))
    assert result.returncode == 0, result.stderr
    return result


def reports(events: Events, runtime_dir: Path) -> dict[str, dict | None]:
    document = json.loads(status(events, runtime_dir, "--json").stdout)
    return {w["label"]: w["imported_after_fork"] for w in document["workers"]}


def stop(master: MasterProcess) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_status_shows_what_a_worker_imported_after_the_fork_and_the_preload_line_that_moves_it(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.lazy:fleet", *REPORT)
    events.wait_kind("imported")
    assert int(master.wait_log(REPORTED.format("lazy")).group(1)) > len(STDLIB)
    report = reports(events, runtime_dir)["lazy"]
    assert report is not None
    assert set(STDLIB) <= set(report["modules"])
    assert report["count"] == len(report["modules"]) and report["dropped"] == 0
    assert report["uss"] > 0  # the child's private memory when it reported
    # In the order their imports completed: a package's module comes after what it imports.
    assert report["modules"].index("xml.dom.minidom") > report["modules"].index("xml.dom")
    # Short: no package of a listed submodule, nothing a listed module imports itself.
    assert "xml.dom.minidom" in report["preload"]
    assert "xml" not in report["preload"] and "xml.dom" not in report["preload"]
    assert "email.mime.nonmultipart" not in report["preload"]  # email.mime.text's import
    assert len(report["preload"]) < len(report["modules"]) / 2

    table = status(events, runtime_dir).stdout.splitlines()
    row, = (line for line in table if line.startswith("lazy "))
    assert f" {report['count']} (" in row
    preload = table[-1].split()
    assert preload[0] == "--preload" and preload[1::2] == report["preload"]
    stop(master)

    # Started again with that line, the worker imports nothing after the fork.
    again = start_master("fleets.lazy:fleet", *REPORT, *preload)
    assert again.wait_log(REPORTED.format("lazy")).group(1) == "0"
    assert reports(events, runtime_dir)["lazy"]["modules"] == []
    assert "--preload" not in status(events, runtime_dir).stdout
    stop(again)


def test_reports_over_the_limit_or_garbled_are_dropped_and_the_master_goes_on(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.lazy:hostile", *REPORT)
    master.wait_log(r"worker flood: its import report is over 256 KiB: dropped")
    assert events.wait_kind("flood-refused")[0]["error"] == "Broken pipe"
    master.wait_log(r"worker garbled: its import report is not one: dropped")
    master.wait_log(REPORTED.format("honest"))
    found = reports(events, runtime_dir)
    assert found["flood"] is None and found["garbled"] is None
    assert set(STDLIB) <= set(found["honest"]["modules"])
    assert len(master.workers()) == 3
    stop(master)


def test_a_child_drops_the_modules_over_the_limit_and_says_how_many(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.lazy:many", *REPORT)
    assert int(master.wait_log(REPORTED.format("many")).group(1)) >= 20000
    report = reports(events, runtime_dir)["many"]
    assert report["dropped"] > 0
    assert len(report["modules"]) + report["dropped"] == report["count"]
    assert len(json.dumps(report)) < MAX_REPORT
    assert report["preload"] == []  # modules put into sys.modules by hand: not importable
    stop(master)


# -- without a process ------------------------------------------------------------------


def _module(name: str, **namespace: object) -> ModuleType:
    module = ModuleType(name)
    module.__spec__ = object()  # type: ignore[assignment]
    vars(module).update(namespace)
    return module


def test_preload_names_keep_a_submodule_its_package_holds_and_drop_what_a_module_imported(
        ) -> None:
    dep = _module("dep")
    pkg = _module("pkg")
    sub = _module("pkg.sub", dep=dep)
    pkg.sub = sub  # set by the import system, after pkg itself had run
    late = _module("late")
    user = _module("user", Late=type("Late", (), {"__module__": "late"}))
    names = [("dep", dep), ("pkg", pkg), ("pkg.sub", sub), ("late", late), ("user", user)]
    # dep: sub holds it; pkg: sub's package; late: user holds a class of it.
    assert preload_names(names) == ["pkg.sub", "user"]
    class Proxy:  # a lazy proxy of a web framework, say, outside its request
        @property
        def __class__(self) -> type:
            raise RuntimeError("working outside of a request")

    assert preload_names([("a", _module("a")), ("b", _module("b", proxy=Proxy()))]) == [
        "a", "b"]
    # A module holding one imported after it did not import it.
    assert preload_names([("a", _module("a", b=_module("b"))), ("b", _module("b"))]) == [
        "a", "b"]


@pytest.mark.parametrize("report", [b"", b"[]", b'{"modules": "x"}', b"\xff",
                                    b'{"modules": [], "preload": [], "count": -1, '
                                    b'"dropped": 0}'])
def test_a_report_not_of_the_documented_shape_is_none(report: bytes) -> None:
    assert parse_report(report) is None


def test_encode_report_round_trips() -> None:
    data = encode_report([("json", sys.modules["json"])], 5096)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert parse_report(data.rstrip()) == {"count": 1, "modules": ["json"],
                                           "preload": ["json"], "dropped": 0,
                                           "uss": 5096}
