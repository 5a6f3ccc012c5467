"""Per-worker process settings: a real master (root) forks a worker that runs as nobody
with its own environment, directory, umask, nice and limits; bad settings are refused at
load with one line; settings the child cannot apply are a failed start with one line."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from conftest import Events, master_env, wait_gone
from prefork import FleetError, Worker, as_fleet
from prefork.exits import ExitCode
from prefork.process_settings import SettingsError, plan_settings

NOBODY = 65534  # nobody and nogroup
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs root")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody may enter (0711, under /tmp), unlike pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="prefork-settings-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def events(open_dir: Path) -> Iterator[Events]:
    """The workers' FIFO where a worker running as nobody can open it (mode 0622)."""
    channel = Events(open_dir / "events.fifo")
    channel.path.chmod(0o622)
    yield channel
    channel.close()


def _env(events: Events, runtime_dir: Path, open_dir: Path, tmp_path: Path) -> dict[str, str]:
    return master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path),
                      PREFORK_TEST_OPEN_DIR=str(open_dir), PREFORK_TEST_DROPPED="secret")


def _proc(pid: int, name: str) -> dict[str, str]:
    """``/proc/PID/status``'s lines as ``{"Uid": "65534\t65534...", ...}``."""
    lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


@needs_root
def test_a_worker_runs_as_nobody_with_its_own_settings(start_master, events: Events,
                                                       runtime_dir: Path, open_dir: Path,
                                                       tmp_path: Path) -> None:
    master = start_master("fleets.settings:as_nobody",
                          env=_env(events, runtime_dir, open_dir, tmp_path))
    seen = events.wait_kind("settings")[0]
    hook = events.wait_kind("post_fork")[0]
    pid = seen["pid"]
    status = _proc(pid, "status")
    limits = Path(f"/proc/{pid}/limits").read_text()
    nice = psutil.Process(pid).nice()
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0

    # Read back by the kernel ...
    assert status["Uid"].split() == [str(NOBODY)] * 4  # real, effective, saved, fs
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["Groups"].split() == [str(NOBODY)]  # root's groups dropped
    assert status["Umask"].strip() == "0027"
    assert "Max open files            256                  512" in limits
    assert "Max core file size        0                    0" in limits
    assert nice == 7
    # ... and by the worker itself.
    assert (seen["uid"], seen["euid"], seen["gid"], seen["groups"]) == (NOBODY, NOBODY,
                                                                       NOBODY, [NOBODY])
    assert seen["regained"] is False, "setuid(0) worked in the worker"
    assert seen["cwd"] == str(open_dir)
    assert seen["umask"] == 0o027 and seen["nice"] == 7
    assert seen["nofile"] == [256, 512] and seen["core"] == [0, 0]
    assert seen["env"] == {"SETTINGS_VAR": "from the fleet", "PREFORK_TEST_DROPPED": None,
                           "HOME": "/nonexistent", "USER": "mine", "LOGNAME": "nobody",
                           "PREFORK_WORKER": "w"}
    # The fleet's post_fork hook runs as the worker runs: after the settings.
    assert hook["pid"] == pid
    assert (hook["uid"], hook["cwd"], hook["var"]) == (NOBODY, str(open_dir), "from the fleet")


@needs_root
def test_a_worker_switched_to_nobody_still_dies_with_its_master(
        start_master, events: Events, runtime_dir: Path, open_dir: Path,
        tmp_path: Path) -> None:
    """A change of uid clears PR_SET_PDEATHSIG: the child must set it after the switch."""
    master = start_master("fleets.settings:as_nobody",
                          env=_env(events, runtime_dir, open_dir, tmp_path))
    pid = events.wait_kind("settings")[0]["pid"]
    master.proc.kill()
    master.proc.wait()
    assert wait_gone([pid]) == [], "the worker outlived its SIGKILLed master"


@needs_root
@pytest.mark.parametrize(("fleet", "message"), [
    ("cwd_denied", r"worker w: cannot apply cwd {open_dir}/private: Permission denied$"),
    ("nofile_above_nr_open", r"worker w: cannot apply rlimit nofile \(\d+, \d+\): not "
                             r"allowed to raise maximum limit$"),
])
def test_settings_the_child_cannot_apply_are_a_failed_start(
        fleet: str, message: str, start_master, events: Events, runtime_dir: Path,
        open_dir: Path, tmp_path: Path) -> None:
    (open_dir / "private").mkdir(mode=0o700)  # root's: nobody may not enter it
    master = start_master(f"fleets.settings:{fleet}",
                          env=_env(events, runtime_dir, open_dir, tmp_path))
    master.wait_log(rf"worker w \(pid \d+\) exited: exit code {ExitCode.CHILD_SETUP_FAILED}")
    master.signal(signal.SIGTERM)
    master.wait_exit()
    lines = [line for line in master.lines if "cannot apply" in line]
    assert len(lines) == 1, master.log
    assert re.search(message.format(open_dir=open_dir), lines[0]), lines[0]
    assert "Traceback" not in master.log
    events.drain()
    assert not events.of("settings"), "the worker's code ran"


BAD_SETTINGS = [
    ("unknown_user", "worker 'w': user 'no-such-user-q' does not exist"),
    ("unknown_uid", "worker 'w': user 4000000000 does not exist"),
    ("unknown_group", "worker 'w': group 'no-such-group-q' does not exist"),
    ("missing_cwd", "worker 'w': cwd /nonexistent/settings-dir does not exist"),
    ("cwd_is_a_file", "worker 'w': cwd /etc/passwd is not a directory"),
    ("unknown_rlimit", "worker 'w': rlimits: unknown limit 'nofiles' (known: as, core, "),
    ("soft_above_hard", "worker 'w': rlimits nofile: the soft limit 600 is above the hard "
                        "limit 500"),
    ("negative_rlimit", "worker 'w': rlimits core: a limit must be an integer >= 0 or "
                        "'unlimited', got -5"),
    ("twice_the_same_rlimit", "worker 'w': rlimits: 'NOFILE' sets nofile again"),
    ("nice_out_of_range", "worker 'w': nice must be an integer from -20 to 19, got 20"),
    ("umask_out_of_range", "worker 'w': umask must be an integer from 0 to 0o777, got 0o1000"),
    ("env_key_not_str", "worker 'w': env: 1 is not a variable name"),
    ("env_value_not_str", "worker 'w': env PORT: the value must be a str without NUL (or "
                          "None to remove the variable), got 8080"),
]


def _run(fleet: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", "run", "--fleet",
                           f"fleets.settings:{fleet}"], capture_output=True, text=True,
                          env=env, timeout=30)


@pytest.mark.parametrize(("fleet", "message"), BAD_SETTINGS, ids=[f for f, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_and_exit_2(fleet: str, message: str, events: Events,
                                              runtime_dir: Path, open_dir: Path,
                                              tmp_path: Path) -> None:
    result = _run(fleet, _env(events, runtime_dir, open_dir, tmp_path))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"prefork: error: {message}")
    events.drain()
    assert not events.seen, "a worker ran although its settings were bad"


def _as_nobody(check: Callable[[], str]) -> str:
    """``check()``'s answer from a forked child that runs as nobody, as a master may."""
    return _in_child(check, as_nobody=True)


def _in_child(check: Callable[[], str], *, as_nobody: bool) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if as_nobody:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            os.write(write, check().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 1000).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def _load_error(fleet: object) -> str:
    try:
        as_fleet(fleet, name="f")
    except FleetError as exc:
        return str(exc)
    return "loaded"


@needs_root
def test_a_master_that_is_not_root_refuses_other_users() -> None:
    """setuid() would fail in every child: refused at load instead, with one line."""
    from fleets.settings import as_root, as_root_group
    assert _as_nobody(lambda: _load_error(as_root)) == (
        "worker 'w': user 'root': the master runs as uid 65534, not root, so its workers "
        "can only run as its own user")
    assert _as_nobody(lambda: _load_error(as_root_group)) == (
        "worker 'w': group 'root': the master runs as uid 65534, not root, so its workers "
        "can only run as its own group")


def _drop_setuid_capabilities() -> None:
    """Take CAP_SETUID and CAP_SETGID out of this process's effective set, as a systemd
    unit's ``CapabilityBoundingSet=`` leaves root without them (capset(2), version 3)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; twice
    assert libc.capget(header, data) == 0
    data[0] &= ~(1 << 6 | 1 << 7)
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())


@needs_root
def test_root_without_the_capability_to_switch_refuses_other_users() -> None:
    from fleets.settings import as_nobody

    def load() -> str:
        _drop_setuid_capabilities()
        return _load_error(as_nobody)

    assert _in_child(load, as_nobody=False) == (
        "worker 'w': user 'nobody': the master runs as root without CAP_SETUID and "
        "CAP_SETGID (as under a systemd unit's CapabilityBoundingSet=), so its workers can "
        "only run as its own user")


# -- the plan, resolved once in the master -----------------------------------------------


def test_a_worker_without_settings_has_no_plan() -> None:
    """Its child does not even call into prefork.process_settings."""
    fleet = as_fleet([Worker("w", print), Worker("v", print, env={}, rlimits={})], name="f")
    assert [w.process_plan for w in fleet.workers] == [None, None]


def test_the_plan_resolves_names_once() -> None:
    plan = as_fleet([Worker("w", print, user="nobody", env={"A": "1", "B": None, "HOME": "/h"},
                            rlimits={"NoFile": "unlimited", "rlimit_core": (0, "unlimited")})],
                    name="f").workers[0].process_plan
    assert plan is not None
    assert plan.rlimits == (
        ("nofile", resource.RLIMIT_NOFILE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)),
        ("core", resource.RLIMIT_CORE, (0, resource.RLIM_INFINITY)))
    assert dict(plan.env) == {"A": "1", "HOME": "/h", "USER": "nobody", "LOGNAME": "nobody"}
    assert plan.unset == ("B",)
    if ROOT:
        assert (plan.uid, plan.gid, plan.groups) == (NOBODY, NOBODY, (NOBODY,))


def test_a_master_that_is_not_root_may_name_itself() -> None:
    """Then the child has nothing to switch: only HOME, USER and LOGNAME are set."""
    def plan() -> str:
        planned = plan_settings(user="nobody", group="nogroup")
        assert planned is not None
        return repr((planned.uid, planned.gid, planned.groups, dict(planned.env)["USER"]))

    if ROOT:
        assert _as_nobody(plan) == "(None, None, None, 'nobody')"
    else:
        assert plan_settings(user=os.geteuid()).uid is None  # type: ignore[union-attr]
        with pytest.raises(SettingsError, match="not root"):
            plan_settings(user="root")
