"""What crosses the fork: the child starts like a standalone worker, with none of the
master's signal handling, descriptors or exit handlers, and with the frozen floor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import TESTS, Events


def _bits(mask: str) -> set[int]:
    value = int(mask, 16)
    return {n for n in range(1, 65) if value & (1 << (n - 1))}


def test_child_starts_clean(start_master, events: Events, runtime_dir) -> None:
    master = start_master("fleets.basic:inspect", "--preload", "fleets.preloaded")
    seen = events.wait_kind("inspect")[0]
    preloaded = events.wait_kind("preloaded")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0

    assert seen["ppid"] == master.pid
    assert _bits(seen["sigblk"]) == set(), "signal mask not cleared"
    caught = _bits(seen["sigcgt"])
    assert signal.SIGTERM not in caught and signal.SIGCHLD not in caught
    assert signal.SIGINT in caught  # Python's own KeyboardInterrupt handler, as standalone

    fds = {int(fd): target for fd, target in seen["fds"].items()
           if not target.startswith("/proc/")}  # the listing's own descriptor
    floor_fd = preloaded[0]["floor_fd"]
    # Beside the floor's own, only the pipe of its import report (prefork.after_fork).
    assert set(fds) == {0, 1, 2, floor_fd, seen["report_fd"]}, f"master descriptors leaked: {fds}"
    assert fds[seen["report_fd"]].startswith("pipe:")
    assert fds[floor_fd] == "/dev/null"  # the floor's own descriptor stays open
    assert not any("lock" in t or "eventpoll" in t for t in fds.values())

    assert seen["cmdline"] == "prefork: worker inspect [inspect]"  # ps
    assert seen["comm"] == "inspect"  # top
    assert seen["env_worker"] == "inspect" and seen["env_replica"] == "0"
    assert seen["freeze_count"] > _interpreter_freeze_count() + 1000  # the floor is frozen
    assert seen["loop_running"] is False


def test_workers_forked_together_hold_only_their_own_pipes(start_master, events: Events,
                                                            tmp_path) -> None:
    """The start-up forks every worker back to back, before closing any child's pipe ends
    in the master: each child must close its siblings' (their log pipes and import
    reports), or a sibling's EOF never comes while it lives."""
    master = start_master("fleets.basic:inspect_many", "--worker-log-dir", str(tmp_path))
    seen = events.wait_kind("inspect", count=3)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    pipes = []
    for child in seen:
        fds = {int(fd): target for fd, target in child["fds"].items()
               if not target.startswith("/proc/")}
        assert set(fds) == {0, 1, 2, child["report_fd"]}, fds  # its log pipe is 1 and 2
        assert fds[1] == fds[2] and fds[1].startswith("pipe:")
        pipes.append({fds[1], fds[child["report_fd"]]})
    assert not (pipes[0] & pipes[1] or pipes[0] & pipes[2] or pipes[1] & pipes[2]), pipes


def test_preload_and_atexit_run_once_in_the_master(start_master, events: Events) -> None:
    master = start_master("fleets.basic:sleepers", "--preload", "fleets.preloaded")
    events.wait_kind("up", count=4)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    events.drain()
    assert [e["pid"] for e in events.of("preloaded")] == [master.pid]
    assert [e["pid"] for e in events.of("atexit")] == [master.pid]  # workers use os._exit


def _interpreter_freeze_count() -> int:
    """Objects the interpreter froze by itself (375 on 3.12.1 at start-up, 0 on 3.11)."""
    out = subprocess.run([sys.executable, "-c", "import gc, fleets.basic; "
                          "print(gc.get_freeze_count())"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(TESTS)}, check=True, timeout=30)
    return int(out.stdout)


@pytest.mark.parametrize(("flag", "frozen"), [("--freeze", True), ("--no-freeze", False)])
def test_freeze_can_be_turned_off(start_master, events: Events, flag: str,
                                  frozen: bool) -> None:
    master = start_master("fleets.basic:inspect", flag)
    seen = events.wait_kind("inspect")[0]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    baseline = _interpreter_freeze_count()
    if frozen:
        assert seen["freeze_count"] > baseline + 1000
    else:
        assert seen["freeze_count"] == baseline


def test_worker_exception_is_logged_with_its_name(start_master, events: Events) -> None:
    master = start_master("fleets.basic:raising")  # restart=never
    events.wait_kind("up")
    assert master.wait_exit() == 5
    master.wait_log(r"\[\d+\] ERROR worker raiser crashed")
    master.wait_log(r"ValueError: boom-42")
    master.wait_log(r"worker raiser \(pid \d+\) exited: exit code 1")
    master.wait_log(r"worker raiser failed \(restart=never\)")


def test_exit_messages_of_workers_dying_together_stay_whole_lines(start_master,
                                                                   events: Events) -> None:
    master = start_master("fleets.basic:goodbyes")  # 16 replicas exit with a message at once
    assert master.wait_exit() == 5
    said = [line for line in master.lines if "says goodbye" in line]
    assert sorted(said) == sorted(f"worker shout{'' if n == 0 else f'.{n}'} says goodbye"
                                  for n in range(16))
