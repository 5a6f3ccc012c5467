"""The same fleets through the library (run_fleet) and through entry points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import Events, MasterProcess, master_env


def test_run_fleet_from_a_script(events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import logging, sys
        from fleets.basic import sleeper
        from prefork import Fleet, Worker, run_fleet

        logging.basicConfig(level=logging.INFO)
        code = run_fleet(Fleet("app", [Worker("a", sleeper), Worker("b", sleeper)]), grace=5)
        print("run_fleet returned", code, file=sys.stderr)
        sys.exit(code)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    master = MasterProcess(proc, events)
    try:
        ups = events.wait_kind("up", count=2)
        assert {e["label"] for e in ups} == {"a", "b"}
        assert {e["ppid"] for e in ups} == {proc.pid}
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0
        master.wait_log(r"run_fleet returned 0")
    finally:
        master.close()


def test_run_fleet_strict_fork_refuses_a_floor_with_a_thread(
        events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "strict.py"
    script.write_text(textwrap.dedent("""
        import sys
        from fleets.threaded import fleet
        from prefork import ThreadsAtFork, run_fleet

        try:
            run_fleet(fleet, strict_fork=True)
        except ThreadsAtFork as exc:
            print("refused:", [t.name for t in exc.threads], file=sys.stderr)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)),
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "refused: ['metrics-flusher']" in result.stderr
    events.drain()
    assert not events.of("up")  # nothing was forked


def test_bundled_demo_fleet_runs_by_its_registered_name(start_master, events: Events) -> None:
    master = start_master("demo")
    master.wait_log(r"worker flaky spawned")
    assert len(master.workers()) == 4
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_prefork_fleets_lists_the_registered_fleets() -> None:
    result = subprocess.run([sys.executable, "-m", "prefork", "fleets"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    assert "demo\tprefork_workers.demo:fleet" in result.stdout.splitlines()


def test_the_prefork_script_finds_a_fleet_module_in_the_working_directory(
        tmp_path: Path, runtime_dir: Path) -> None:
    """As with gunicorn: `prefork run --fleet myfleet:fleet` from the project directory,
    through the installed console script (not `python -m`, which adds the cwd itself)."""
    (tmp_path / "myfleet.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from prefork import Fleet, Worker

        def once() -> None:
            Path("ran").write_text("yes")

        fleet = Fleet("myfleet", [Worker("once", once)], restart="never")
    """))
    script = Path(sys.executable).parent / "prefork"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PREFORK_RUNTIME_DIR"] = str(runtime_dir)
    result = subprocess.run([str(script), "run", "--fleet", "myfleet:fleet", "--preload",
                             "myfleet"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran").read_text() == "yes"
