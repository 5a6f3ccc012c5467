"""The runtime directory: checked once, then used only through what was checked; names and
paths that cannot work are one line and exit 2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

import fleets.basic  # noqa: F401  (imported here, for the child of _as that runs as nobody)
import prefork.master  # noqa: F401  (the same: `prefork run` imports it late)
from conftest import Events, master_env
from prefork import paths
from prefork.cli import main
from prefork.control import ControlServer, command_table
from prefork.lock import AlreadyRunning, FleetLock
from prefork.paths import default_runtime_dir, name_problem, socket_path

# -- names and paths that cannot work ---------------------------------------------------------


def test_name_length_is_capped_by_the_file_names_it_becomes() -> None:
    assert paths.MAX_NAME == 250  # NAME.lock, NAME.sock: 255 bytes at most
    assert name_problem("a" * 250) is None
    assert name_problem("a" * 251) == (
        f"fleet name {'a' * 20}... is 251 characters long; at most 250 fit in a file name")
    assert name_problem("w" * 300, "worker") == (
        f"worker name {'w' * 20}... is 300 characters long; at most 250 fit in a file name")


LONG = "y" * 260


@pytest.fixture
def long_names(tmp_path: Path) -> Path:
    """A module ``long_names`` on the path the subprocesses get, with fleets whose fleet or
    worker name is too long."""
    (tmp_path / "long_names.py").write_text(
        "from prefork import Fleet, Worker\n"
        "def w():\n    pass\n"
        f"fleet = Fleet(name={LONG!r}, workers=[Worker('w', w)])\n"
        f"worker = Fleet(name='short', workers=[Worker({LONG!r}, w)])\n"
        f"sock = Fleet(name={'z' * 200!r}, workers=[Worker('w', w)])\n")
    return tmp_path


def _prefork(args: list[str], env: dict[str, str],
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=30)


@pytest.mark.parametrize(("attribute", "message"), [
    ("fleet", f"fleet name {'y' * 20}... is 260 characters long; at most 250 fit in a file "
              "name"),
    ("worker", f"worker name {'y' * 20}... is 260 characters long; at most 250 fit in a "
               "file name"),
    # Fits a file name, but not sun_path: the control server's own check.
    ("sock", "AF_UNIX path too long"),
])
def test_a_name_too_long_is_one_line(attribute: str, message: str, long_names: Path,
                                     events: Events, runtime_dir: Path) -> None:
    env = master_env(events, runtime_dir)
    env["PYTHONPATH"] += os.pathsep + str(long_names)
    result = _prefork(["run", "--fleet", f"long_names:{attribute}"], env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("prefork: error: ")
    assert not [e for e in events.seen if e.get("kind") == "up"]


def test_status_of_a_name_too_long_is_one_line(events: Events, runtime_dir: Path) -> None:
    result = _prefork(["status", "--fleet", LONG], master_env(events, runtime_dir))
    assert (result.returncode, result.stderr) == (2, (
        f"prefork: error: fleet name {'y' * 20}... is 260 characters long; at most 250 fit "
        "in a file name\n"))


OPERATE = [["status"], ["reload"], ["scale", "w", "+1"]]
RUN = ["run", "--fleet", "fleets.basic:sleepers"]


@pytest.mark.parametrize("given", ["", "run", "./run", "../x"])
@pytest.mark.parametrize("command", [RUN, *OPERATE], ids=lambda c: c[0])
def test_a_relative_runtime_dir_option_is_one_line(command: list[str], given: str,
                                                   events: Events, runtime_dir: Path,
                                                   tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir(mode=0o700)
    result = _prefork([*command, "--runtime-dir", given], master_env(events, runtime_dir),
                      cwd=cwd)
    assert (result.returncode, result.stderr) == (2, (
        f"prefork: error: Invalid value for '--runtime-dir': must be an absolute path, "
        f"not {given!r}\n"))
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("variable", ["PREFORK_RUNTIME_DIR", "RUNTIME_DIRECTORY"])
@pytest.mark.parametrize("command", [RUN, *OPERATE], ids=lambda c: c[0])
def test_a_relative_runtime_dir_variable_is_one_line(command: list[str], variable: str,
                                                     events: Events, runtime_dir: Path,
                                                     tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir(mode=0o700)
    env = master_env(events, runtime_dir)
    del env["PREFORK_RUNTIME_DIR"]
    env[variable] = "run"
    result = _prefork(command, env, cwd=cwd)
    assert (result.returncode, result.stderr) == (
        2, f"prefork: error: ${variable} must be an absolute path, not 'run'\n")
    assert os.listdir(cwd) == []


def test_a_relative_xdg_runtime_dir_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("PREFORK_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "run/user")
    assert default_runtime_dir() == Path(f"/tmp/prefork-{os.getuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert default_runtime_dir() == Path("/run/user/7/prefork")
    monkeypatch.setenv("PREFORK_RUNTIME_DIR", "")  # empty: unset
    assert default_runtime_dir() == Path("/run/user/7/prefork")



# -- a path swapped for a symlink after the check -------------------------------------------


@pytest.fixture
def swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """(runtime dir, victim): the moment the runtime directory has been checked (its
    ``fstat``), an attacker renames it away and puts a symlink to ``victim`` in its place,
    the worst case of the race in a directory others may write. ``victim`` is a private
    directory of ours with a service's socket ``f.sock`` in it."""
    runtime_dir, victim = tmp_path / "run", tmp_path / "victim"
    runtime_dir.mkdir(mode=0o700)
    victim.mkdir(mode=0o700)
    checked = runtime_dir.stat()
    real_fstat = os.fstat

    def fstat_then_swap(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        if (info.st_dev, info.st_ino) == (checked.st_dev, checked.st_ino) \
                and not runtime_dir.is_symlink():
            runtime_dir.rename(tmp_path / "moved")
            runtime_dir.symlink_to(victim)
        return info

    service = socket.socket(socket.AF_UNIX)
    service.bind(str(victim / "f.sock"))
    service.listen()
    monkeypatch.setattr(os, "fstat", fstat_then_swap)
    yield runtime_dir, victim
    monkeypatch.undo()
    service.close()


def _untouched(victim: Path) -> None:
    assert os.listdir(victim) == ["f.sock"]
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(victim / "f.sock"))  # still the service's, still listening


def test_the_lock_is_made_in_the_directory_checked(swapped: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    runtime_dir, victim = swapped
    lock = FleetLock(runtime_dir, "f")
    lock.acquire()
    try:
        assert runtime_dir.is_symlink(), "the attacker's swap did not happen"
        _untouched(victim)
        assert (tmp_path / "moved" / "f.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_the_socket_is_made_in_the_directory_checked(swapped: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    runtime_dir, victim = swapped
    control = ControlServer(socket_path(runtime_dir, "f"),
                            command_table(status=dict, scale=dict, reload=dict))
    control.open()
    try:
        assert runtime_dir.is_symlink(), "the attacker's swap did not happen"
        _untouched(victim)
        assert os.listdir(tmp_path / "moved") == ["f.sock"]
    finally:
        control.close()
    _untouched(victim)  # close() removes only the file it bound



# -- a directory where the lock cannot be made --------------------------------------------

as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to take another uid")
NOBODY = 65534


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """A 0500 directory of uid nobody under /tmp (which nobody can reach, unlike tmp_path)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"prefork-test-0500-{os.getpid()}"
    path.mkdir(mode=0o500)
    os.chown(path, 65534, 65534)
    yield path
    path.rmdir()


def _as(user: str, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`prefork ARGS`: its exit code and stderr. As nobody it runs in a forked child of
    this process that drops to uid nobody, not in a fresh interpreter: nobody may be
    unable to import prefork from this checkout (a clone in a 0700 directory)."""
    if user != "nobody":
        result = subprocess.run([sys.executable, "-m", "prefork", *args], capture_output=True,
                                text=True, env=env, timeout=30)
        return result.returncode, result.stderr
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(write_end, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115  (pytest replaced it)
            os.environ.clear()
            os.environ.update(env)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()  # the test shows it: exit 70, and why
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with open(read_end, "rb") as child_stderr:
        stderr = child_stderr.read().decode()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stderr


@as_root
@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.parametrize(("directory", "as_root_says", "as_nobody_says"), [
    ("/proc/1", "lock /proc/1/sleepers.lock: No such file or directory",
     "runtime directory /proc/1 belongs to uid 0, not to uid 65534"),
    ("/sys/kernel", "lock /sys/kernel/sleepers.lock: Permission denied",
     "runtime directory /sys/kernel belongs to uid 0, not to uid 65534"),
    ("/proc/1/new", "runtime directory /proc/1/new: No such file or directory",
     "runtime directory /proc/1/new: No such file or directory"),
    ("0500", None, "lock {}/sleepers.lock: Permission denied"),
])
def test_a_runtime_dir_without_room_for_the_lock_is_one_line(
        user: str, directory: str, as_root_says: str | None, as_nobody_says: str,
        read_only_dir: Path, events: Events, runtime_dir: Path) -> None:
    if directory == "0500":
        if user == "root":
            pytest.skip("root may write in a 0500 directory")
        directory = str(read_only_dir)
    expected = (as_root_says if user == "root" else as_nobody_says).format(read_only_dir)
    env = master_env(events, runtime_dir)
    code, stderr = _as(user, [*RUN, "--runtime-dir", directory], env)
    assert code == 2, stderr
    assert stderr.startswith(f"prefork: error: {expected}"), stderr
    assert len(stderr.splitlines()) == 1, stderr


@as_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_full_runtime_dir_is_one_line(events: Events, runtime_dir: Path,
                                        tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    # A 4 KiB tmpfs, filled, in a mount namespace of the master's own: the lock file can
    # be created (an inode) but not given the master's pid (a page).
    script = (f"mount -t tmpfs -o size=4k,mode=0700 tmpfs {full} && "
              f"{{ head -c 4096 /dev/zero > {full}/filler; exec \"$@\"; }}")
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "prefork", *RUN,
         "--runtime-dir", str(full)],
        capture_output=True, text=True, env=master_env(events, runtime_dir), timeout=30)
    assert (result.returncode, result.stderr) == (
        2, f"prefork: error: lock {full}/sleepers.lock: No space left on device\n")



# -- the lock's guard name ------------------------------------------------------------------


@pytest.mark.parametrize("length", [10, 200], ids=["readable", "hashed"])
def test_the_guard_name_holds_when_the_lock_file_is_gone(length: int,
                                                          tmp_path: Path) -> None:
    runtime_dir = tmp_path / ("d" * length)
    first = FleetLock(runtime_dir, "f")
    first.acquire()
    try:
        shutil.rmtree(runtime_dir)
        second = FleetLock(runtime_dir, "f")
        with pytest.raises(AlreadyRunning, match=rf"\(master pid {os.getpid()}; its lock "):
            second.acquire()
        assert second.fds() == [] and second.fd is None
        assert (runtime_dir / "f.lock").read_text() == ""  # the refused one wrote nothing
    finally:
        first.release()
    assert first.fds() == []
    second.acquire()  # the first let go of both
    second.release()
