"""``prefork systemd``: a unit that systemd accepts and rates SAFE, and that a fleet runs under.

No systemd runs here, so "runs under" is checked by hand: the unit's seccomp settings
(SystemCallFilter=, SystemCallErrorNumber=, MemoryDenyWriteExecute=,
RestrictAddressFamilies=, RestrictNamespaces=) are rebuilt with libseccomp, one filter per
setting as systemd does, and applied to a real master and its workers. With metrics on,
ProtectSystem=strict and ReadWritePaths= are rebuilt too, as a read-only mount namespace
(root only), so the exporter proves it can listen and write its textfile.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest

import prefork.unit
from conftest import WAIT, Events, MasterProcess, cli_in_child
from prefork.metrics_process import MetricsOptions
from prefork.unit import DaskUnit, UnitError, reachability_warnings, render_unit, unit_name

VENV = Path(sys.prefix)  # verify checks that ExecStart= exists: use the real venv
MAX_EXPOSURE = 2.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed: cannot verify or rate the unit")


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, in order, ignoring sections and comments."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def fake_venv(parent: Path, name: str = "venv") -> Path:
    """A directory with an executable bin/prefork: enough for render_unit and verify."""
    script = parent / name / "bin" / "prefork"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return parent / name


def seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


@pytest.fixture
def textfiles_in_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a unit's textfile live under pytest's tmp_path, which is under /tmp: the unit
    refuses that because of PrivateTmp=, which these tests do not depend on."""
    monkeypatch.setattr(prefork.unit, "_PRIVATE_ROOTS", ())


# -- the rendered text ------------------------------------------------------------------

def test_the_template_ships_in_prefork_units() -> None:
    template = resources.files("prefork_units").joinpath("prefork-fleet.service.in")
    assert template.is_file()
    assert "${exec_start}" in template.read_text()


def test_defaults_for_the_demo_fleet() -> None:
    text = render_unit("demo", venv=VENV)
    unit = directives(text)
    assert text.startswith("# prefork-demo.service: ")
    assert unit_name("demo") == "prefork-demo.service"
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"{VENV}/bin/prefork run --fleet demo --grace 15"]
    assert unit["ExecReload"] == [f"{VENV}/bin/prefork reload --fleet demo"]
    assert unit["KillMode"] == ["mixed"]
    assert seconds(unit["TimeoutStopSec"][0]) > 15
    assert unit["Restart"] == ["on-failure"]
    assert seconds(unit["RestartSec"][0]) > 0
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["DynamicUser"] == ["yes"]
    assert "User" not in unit and "Group" not in unit
    assert unit["RuntimeDirectory"] == ["prefork/demo"]
    assert unit["StateDirectory"] == ["prefork/demo"]
    assert unit["Environment"] == ["XDG_DATA_HOME=%S/prefork/demo"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit["IPAddressDeny"] == ["any"] and unit["PrivateNetwork"] == ["yes"]
    for absent in ("Conflicts", "After", "MemoryMax", "WorkingDirectory"):
        assert absent not in unit, absent
    assert "\n\n\n" not in text and "${" not in text


def test_learn_floor_goes_to_exec_start_and_its_file_to_the_state_directory() -> None:
    unit = directives(render_unit("demo", venv=VENV, learn_floor=True))
    assert unit["ExecStart"] == [f"{VENV}/bin/prefork run --fleet demo --grace 15 --learn-floor"]
    assert unit["StateDirectory"] == ["prefork/demo"]  # $STATE_DIRECTORY: FLEET.floor


def test_every_option_shows_in_the_unit(tmp_path: Path) -> None:
    unit = directives(render_unit(
        "cpu", venv=VENV, user="prefork", group="prefork", workdir=tmp_path,
        conflicts=["cpu-clusterer.service", "cpu-attribution.service", "cpu-clusterer.service"],
        grace=42.5, memory_max="2G", watchdog=0, network=True))
    assert unit["ExecStart"] == [f"{VENV}/bin/prefork run --fleet cpu --grace 42.5"]
    assert seconds(unit["TimeoutStopSec"][0]) > 42.5
    assert unit["User"] == ["prefork"] and unit["Group"] == ["prefork"]
    assert "DynamicUser" not in unit
    assert unit["WorkingDirectory"] == [str(tmp_path)]
    both = "cpu-clusterer.service cpu-attribution.service"
    assert unit["Conflicts"] == [both]
    assert both in unit["After"]
    assert unit["MemoryMax"] == ["2G"]
    assert "WatchdogSec" not in unit
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "IPAddressDeny" not in unit and "PrivateNetwork" not in unit


def test_protect_home_is_read_only_only_when_the_unit_needs_a_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = fake_venv(tmp_path)
    assert directives(render_unit("demo", venv=venv))["ProtectHome"] == ["yes"]
    monkeypatch.setattr(prefork.unit, "_HOME_ROOTS", (tmp_path,))
    assert directives(render_unit("demo", venv=venv))["ProtectHome"] == ["read-only"]


def test_a_dynamic_user_is_warned_about_a_closed_directory(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    venv = fake_venv(closed)
    # pytest's own base directory may be closed too (/tmp/pytest-of-root is 0700).
    [warning] = reachability_warnings(venv, user=None)
    assert warning.startswith(f"{venv} is not reachable for the unit's dynamic user (")
    assert warning.endswith("is not searchable by others): pass --user, or use a venv and "
                            "Python outside it")
    assert reachability_warnings(venv, user="prefork") == []
    closed.chmod(0o711)
    assert f"({closed} is not" not in "".join(reachability_warnings(venv, user=None))


@pytest.mark.usefixtures("textfiles_in_tmp")
def test_metrics_on_loopback_and_a_textfile(tmp_path: Path) -> None:
    textfile = tmp_path / "fleet.prom"
    text = render_unit("demo", venv=VENV, metrics=MetricsOptions(
        listen=("127.0.0.1", 9100), textfile=textfile, interval=5))
    unit = directives(text)
    assert unit["ExecStart"] == [f"{VENV}/bin/prefork run --fleet demo --grace 15 --metrics "
                                 f"127.0.0.1:9100 --metrics-textfile {textfile} "
                                 "--metrics-interval 5"]
    # The host's loopback: a private network namespace would have a loopback of its own.
    assert "PrivateNetwork" not in unit
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET"]
    assert unit["IPAddressDeny"] == ["any"] and unit["IPAddressAllow"] == ["localhost"]
    assert unit["ReadWritePaths"] == [str(tmp_path)]
    assert unit["ProtectSystem"] == ["strict"]
    assert "\n\n\n" not in text and "${" not in text


@pytest.mark.parametrize(("listen", "allow", "network", "families", "allowed"), [
    (("::1", 0), (), False, "AF_UNIX AF_INET6", ["localhost"]),
    (("localhost", 9100), (), False, "AF_UNIX AF_INET AF_INET6", ["localhost"]),
    (("0.0.0.0", 9100), ("192.0.2.10", "2001:db8::/32", "192.0.2.10"), False,
     "AF_UNIX AF_INET", ["192.0.2.10 2001:db8::/32"]),
    (("::", 9100), ("any",), False, "AF_UNIX AF_INET6", ["any"]),
    (("0.0.0.0", 9100), (), True, "AF_UNIX AF_INET AF_INET6", None),
])
def test_metrics_open_the_network_for_the_listener_only(
        listen: tuple[str, int], allow: tuple[str, ...], network: bool, families: str,
        allowed: list[str] | None) -> None:
    unit = directives(render_unit("demo", venv=VENV, network=network, metrics_allow=allow,
                                  metrics=MetricsOptions(listen=listen)))
    host, port = listen
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert unit["ExecStart"][0].endswith(f" --metrics {shown}")
    assert "PrivateNetwork" not in unit and "ReadWritePaths" not in unit
    assert unit["RestrictAddressFamilies"] == [families]
    assert unit.get("IPAddressAllow") == allowed
    assert unit.get("IPAddressDeny") == (None if network else ["any"])


def test_a_textfile_alone_keeps_the_network_private() -> None:
    directory = Path("/var/lib")  # an existing directory outside /tmp (a clone may be in it)
    unit = directives(render_unit("demo", venv=VENV, metrics=MetricsOptions(
        textfile=directory / "fleet.prom")))
    assert unit["PrivateNetwork"] == ["yes"] and unit["IPAddressDeny"] == ["any"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit["ReadWritePaths"] == [str(directory)]
    assert "--metrics " not in unit["ExecStart"][0]
    assert "--metrics-interval" not in unit["ExecStart"][0]  # the default is not repeated


def test_dask_workers_on_the_floor_of_a_fleet_are_a_unit_of_their_own() -> None:
    text = render_unit("cpu", venv=VENV, dask=DaskUnit("tcp://10.0.0.5:8786", nworkers=4))
    unit = directives(text)
    assert text.startswith("# prefork-cpu-dask.service: ")
    assert unit_name("cpu", DaskUnit("tcp://10.0.0.5:8786")) == "prefork-cpu-dask.service"
    assert unit["Description"] == ["prefork Dask workers for tcp://10.0.0.5:8786 on the "
                                   "floor of fleet cpu"]
    assert unit["ExecStart"] == [f"{VENV}/bin/prefork dask-worker tcp://10.0.0.5:8786 "
                                 "--fleet cpu --nworkers 4 --grace 15"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # its workers, from its floor
    # Beside a `prefork run --fleet cpu` unit on the same host: directories of its own.
    assert unit["RuntimeDirectory"] == ["prefork/cpu-dask"]
    assert unit["StateDirectory"] == ["prefork/cpu-dask"]
    # The workers reach the scheduler, and it, its clients and the other workers reach
    # them: IP in and out, once the network is up.
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "PrivateNetwork" not in unit and "IPAddressDeny" not in unit
    assert unit["Wants"] == ["network-online.target"]
    assert unit["After"] == ["network-online.target"]
    assert "\n\n\n" not in text and "${" not in text
    threads = directives(render_unit("m.od:floor", venv=VENV, dask=DaskUnit(
        "tcp://[fd00::5]:8786", nworkers=2, nthreads=3)))
    assert threads["ExecStart"] == [f"{VENV}/bin/prefork dask-worker tcp://[fd00::5]:8786 "
                                    "--fleet m.od:floor --nworkers 2 --nthreads 3 --grace 15"]


def test_a_dynamic_user_is_warned_about_a_textfile_directory_it_cannot_write(
        tmp_path: Path) -> None:
    directory = tmp_path / "textfiles"
    directory.mkdir()
    directory.chmod(0o755)
    textfile = directory / "f.prom"

    def not_writable() -> list[str]:
        return [w for w in reachability_warnings(VENV, None, textfile=textfile)
                if "not writable" in w]

    assert not_writable() == [f"{directory} is not writable for the unit's dynamic user "
                              "(not writable by others), so the exporter cannot write the "
                              "textfile: pass --user, one that may write there"]
    directory.chmod(0o1777)
    assert not_writable() == []
    directory.chmod(0o755)
    assert reachability_warnings(VENV, "prefork", textfile=textfile) == []


@pytest.mark.parametrize(("fleet", "options", "message"), [
    ("demo", {"grace": float("nan")}, "--grace must be a finite number"),
    ("demo", {"watchdog": -1}, "--watchdog must be a finite number"),
    ("a..b:c", {}, "cannot go into a unit"),
    ("de mo", {}, "cannot go into a unit"),
    ("demo", {"memory_max": "0"}, "no memory at all"),
    ("demo", {"memory_max": "150%"}, "at most 100"),
    ("demo", {"user": "-rf"}, "not a valid user or group name"),
    ("demo", {"metrics": MetricsOptions()}, "metrics need a listen address"),
    ("demo", {"metrics": MetricsOptions(listen=("127.0.0.1", 1), interval=0)},
     "--metrics-interval must be a finite number of seconds > 0"),
    ("demo", {"metrics": MetricsOptions(textfile=Path("/dev/shm/f.prom"))},
     "PrivateDevices=yes"),
    ("cpu", {"dask": DaskUnit("10.0.0.5:8786")}, "is not tcp://HOST:PORT"),
    ("cpu", {"dask": DaskUnit("tcp://10.0.0.5:8786", nworkers=0)}, "--nworkers must be 1"),
    ("cpu", {"dask": DaskUnit("tcp://h:1", nthreads=True)}, "--nthreads must be 1"),
    ("cpu", {"dask": DaskUnit("tcp://h:1"), "learn_floor": True}, "--learn-floor is for"),
])
def test_render_unit_refuses(fleet: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(UnitError, match=re.escape(message)):
        render_unit(fleet, venv=VENV, **options)  # type: ignore[arg-type]


# -- what systemd makes of it -----------------------------------------------------------

def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=30)


def exposure(path: Path) -> float:
    """The overall exposure ``systemd-analyze security`` gives the unit (0 best, 10 worst)."""
    result = analyze("security", "--offline=true", str(path))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    return float(match.group(1))


UNITS: dict[str, Callable[[Path], str]] = {
    "demo": lambda tmp: render_unit("demo", venv=VENV),
    "demo outside home": lambda tmp: render_unit("demo", venv=fake_venv(tmp)),
    "escaped paths": lambda tmp: render_unit(
        "pkg.mod:fleet", venv=fake_venv(tmp, "my venv %i$x"), workdir=fake_venv(tmp, "w %n"),
        memory_max="50%", watchdog=0.5, grace=0),
    "cpu, every option": lambda tmp: render_unit(
        "cpu", venv=VENV, user="prefork", group="prefork", workdir=tmp,
        conflicts=["cpu-clusterer.service", "legacy.target"], grace=2.5, memory_max="1.5G",
        watchdog=10, network=True),
    "metrics on loopback, a textfile": lambda tmp: render_unit(
        "demo", venv=VENV, metrics=MetricsOptions(listen=("127.0.0.1", 9100),
                                                  textfile=tmp / "demo.prom", interval=2.5)),
    "metrics for a Prometheus server": lambda tmp: render_unit(
        "demo", venv=VENV, metrics=MetricsOptions(listen=("::", 9100)),
        metrics_allow=["192.0.2.10", "2001:db8::/32"]),
    "dask workers": lambda tmp: render_unit(
        "cpu", venv=VENV, dask=DaskUnit("tcp://10.0.0.5:8786", nworkers=4, nthreads=2)),
    "dask workers with metrics on loopback": lambda tmp: render_unit(
        "demo", venv=VENV, dask=DaskUnit("tcp://127.0.0.1:8786"),
        metrics=MetricsOptions(listen=("127.0.0.1", 9100))),
    "metrics with --network": lambda tmp: render_unit(
        "cpu", venv=VENV, user="prefork", network=True,
        metrics=MetricsOptions(listen=("0.0.0.0", 0), textfile=tmp / "cpu.prom")),
}


@needs_systemd_analyze
@pytest.mark.usefixtures("textfiles_in_tmp")
@pytest.mark.parametrize("case", UNITS)
def test_systemd_accepts_the_unit_and_rates_it_safe(case: str, tmp_path: Path) -> None:
    text = UNITS[case](tmp_path)
    path = tmp_path / "prefork-test.service"
    path.write_text(text)
    result = analyze("verify", str(path))
    # verify reports a bad setting ("Invalid memory limit ..., ignoring") and still exits 0.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if path.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    assert exposure(path) <= MAX_EXPOSURE


# -- the command ------------------------------------------------------------------------

def prefork_systemd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", "systemd", *args],
                          capture_output=True, text=True, timeout=30)


def test_the_command_prints_the_rendered_unit() -> None:
    result = prefork_systemd("--fleet", "demo", "--conflicts", "old.service",
                             "--memory-max", "512M", "--grace", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_unit("demo", venv=VENV, conflicts=["old.service"],
                                        memory_max="512M", grace=5)
    assert all(line.startswith("prefork: warning: ") for line in result.stderr.splitlines())


def test_the_command_renders_the_metrics_options() -> None:
    textfile = Path("/var/lib/prefork-demo.prom")  # rendering only: nothing is written
    if not textfile.parent.is_dir():
        pytest.skip("no /var/lib here")
    result = prefork_systemd("--fleet", "demo", "--metrics", "0.0.0.0:9100",
                             "--metrics-allow", "192.0.2.10", "--metrics-textfile",
                             str(textfile), "--metrics-interval", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_unit(
        "demo", venv=VENV, metrics_allow=["192.0.2.10"], metrics=MetricsOptions(
            listen=("0.0.0.0", 9100), textfile=textfile, interval=5))
    assert all(line.startswith("prefork: warning: ") for line in result.stderr.splitlines())


def test_the_command_renders_a_unit_of_dask_workers() -> None:
    result = prefork_systemd("--fleet", "cpu", "--dask-scheduler", "tcp://10.0.0.5:8786",
                             "--nworkers", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_unit("cpu", venv=VENV,
                                        dask=DaskUnit("tcp://10.0.0.5:8786", nworkers=4))
    assert all(line.startswith("prefork: warning: ") for line in result.stderr.splitlines())


BAD_OPTIONS = [
    (["--fleet", "nosuchfleet"], "unknown fleet 'nosuchfleet' (known: "),
    (["--fleet", "demo", "--venv", "/"], "venv / has no executable bin/prefork"),
    (["--fleet", "demo", "--workdir", "/no/such/dir"], "/no/such/dir does not exist"),
    (["--fleet", "demo", "--conflicts", "old-mailer"], "'old-mailer' is not a unit name"),
    (["--fleet", "demo", "--conflicts", "a b.service"], "'a b.service' is not a unit name"),
    (["--fleet", "demo", "--conflicts", "x/y.service"], "'x/y.service' is not a unit name"),
    (["--fleet", "demo", "--memory-max", "lots"], "--memory-max 'lots' is not a systemd size"),
    (["--fleet", "demo", "--memory-max", "512m"], "--memory-max '512m' is not a systemd size"),
    (["--fleet", "demo", "--grace", "-1"], "'--grace'"),
    (["--fleet", "demo", "--watchdog", "-5"], "'--watchdog'"),
    (["--fleet", "demo", "--group", "staff"], "--group needs --user"),
    (["--fleet", "demo", "--network", "--bogus"], "No such option"),
    ([], "Missing option '--fleet'"),
    (["--fleet", "demo", "--metrics", "70000"], "'70000' is not HOST:PORT"),
    (["--fleet", "demo", "--metrics", "prometheus.example:9100"],
     "needs an IP address or localhost"),
    (["--fleet", "demo", "--metrics", "0.0.0.0:9100"], "name the Prometheus server with "
     "--metrics-allow ADDRESS (or --metrics-allow any), or pass --network"),
    (["--fleet", "demo", "--metrics", "9100", "--metrics-allow", "192.0.2.10"],
     "--metrics 127.0.0.1:9100 is on loopback, which no other host reaches"),
    (["--fleet", "demo", "--metrics", "[::]:9100", "--metrics-allow", "prometheus"],
     "--metrics-allow 'prometheus' is not an IP address"),
    (["--fleet", "demo", "--metrics", "0.0.0.0:9100", "--network", "--metrics-allow", "any"],
     "--metrics-allow is for a unit without --network"),
    (["--fleet", "demo", "--metrics-allow", "any"], "it needs --metrics"),
    (["--fleet", "demo", "--metrics-textfile", "/tmp/demo.prom"],
     "the unit has PrivateTmp=yes, so a file under /tmp is private to it"),
    (["--fleet", "demo", "--metrics-textfile", "/var/tmp/demo.prom"],
     "a file under /var/tmp is private to it"),
    (["--fleet", "demo", "--metrics-textfile", "demo.prom"], "a unit needs an absolute path"),
    (["--fleet", "demo", "--metrics-textfile", "/var/lib/demo.txt"], "must end in .prom"),
    (["--fleet", "demo", "--metrics-textfile", "/var/lib/my demo.prom"],
     "a unit takes only letters, digits"),
    (["--fleet", "demo", "--metrics-textfile", "/no/such/dir/demo.prom"],
     "/no/such/dir is not a directory"),
    (["--fleet", "demo", "--metrics-textfile", "/var/lib/x.prom", "--metrics-interval", "0"],
     "'0' must be more than 0 seconds"),
    (["--fleet", "cpu", "--nworkers", "4"], "they need --dask-scheduler tcp://HOST:PORT"),
    (["--fleet", "cpu", "--dask-scheduler", "10.0.0.5:8786"], "is not tcp://HOST:PORT"),
    (["--fleet", "cpu", "--dask-scheduler", "tcp://10.0.0.5:8786", "--nworkers", "0"],
     "--nworkers must be 1 to 1024, got 0"),
    (["--fleet", "cpu", "--dask-scheduler", "tcp://10.0.0.5:8786", "--learn-floor"],
     "--learn-floor is for `prefork run`"),
    (["--fleet", "nosuchfleet", "--dask-scheduler", "tcp://10.0.0.5:8786"],
     "unknown fleet 'nosuchfleet'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS,
                         ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = cli_in_child(["systemd", *args], dict(os.environ))  # as prefork_systemd answers
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prefork: error: ") and message in lines[0], lines[0]
    assert result.stdout == ""


# -- a fleet under the unit's seccomp filters -------------------------------------------

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET,TIME}
# Allowed whatever SystemCallFilter= says (systemd.exec(5)).
IMPLICIT_SYSCALLS = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def errno_action(number: int) -> int:
    return 0x00050000 | number


def libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        pytest.skip("libseccomp is not installed: cannot apply the unit's seccomp filters")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def syscall_groups() -> dict[str, set[str]]:
    """Each ``@group`` of ``systemd-analyze syscall-filter``, nested groups expanded."""
    groups: dict[str, list[str]] = {}
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and not line.strip().startswith("#") and line.strip():
            current.append(line.strip())

    def expand(name: str) -> set[str]:
        return set().union(*(expand(m) if m.startswith("@") else {m} for m in groups[name]))

    return {name: expand(name) for name in groups}


def seccomp_loader(unit: dict[str, list[str]]) -> Callable[[], None]:
    """Build the unit's filters now; the returned function loads them (in the child)."""
    lib = libseccomp()
    groups = syscall_groups()

    def names(words: str) -> set[str]:
        return set().union(*(groups[w] if w.startswith("@") else {w} for w in words.split()))

    def rule(ctx: int, action: int, syscall: str, *compare: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(syscall.encode())
        if number < 0:  # not a system call of this architecture
            return
        args = (ArgCmp * max(1, len(compare)))(*(ArgCmp(*c) for c in compare))
        rc = lib.seccomp_rule_add_array(ctx, action, number, len(compare), args)
        assert rc == 0, f"seccomp rule for {syscall}: {os.strerror(-rc)}"

    contexts = []
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        eperm = errno_action(errno.EPERM)
        rule(ctx, eperm, "mmap", (2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC,
                                  PROT_WRITE | PROT_EXEC))
        rule(ctx, eperm, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rule(ctx, eperm, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rule(ctx, eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        contexts.append(ctx)
    if "RestrictAddressFamilies" in unit:
        allowed = {getattr(socket, name) for name in unit["RestrictAddressFamilies"][0].split()}
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        refuse = errno_action(errno.EAFNOSUPPORT)
        for family in set(range(max(allowed) + 1)) - allowed:
            rule(ctx, refuse, "socket", (0, SCMP_CMP_EQ, family, 0))
        rule(ctx, refuse, "socket", (0, SCMP_CMP_GT, max(allowed), 0))
        contexts.append(ctx)
    if unit.get("RestrictNamespaces") == ["yes"]:
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        for flag in NAMESPACE_FLAGS:
            for syscall in ("unshare", "clone"):
                rule(ctx, errno_action(errno.EPERM), syscall,
                     (0, SCMP_CMP_MASKED_EQ, flag, flag))
        rule(ctx, errno_action(errno.EPERM), "setns")
        rule(ctx, errno_action(errno.ENOSYS), "clone3")  # flags out of seccomp's reach
        contexts.append(ctx)
    filters = unit["SystemCallFilter"]
    assert not filters[0].startswith("~"), "expected an allow list"
    allowed_calls = names(filters[0]) | IMPLICIT_SYSCALLS
    for words in filters[1:]:
        if words.startswith("~"):
            allowed_calls -= names(words[1:])
        else:
            allowed_calls |= names(words)
    ctx = lib.seccomp_init(errno_action(getattr(errno, unit["SystemCallErrorNumber"][0])))
    for syscall in sorted(allowed_calls):
        rule(ctx, SCMP_ACT_ALLOW, syscall)
    contexts.append(ctx)  # last: loading the others needs seccomp(2), which it denies

    def load() -> None:
        for ctx in contexts:
            if lib.seccomp_load(ctx) != 0:
                raise OSError(ctypes.get_errno(), "seccomp_load")

    return load


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
CLONE_NEWNS = 0x00020000
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
KERNEL_MOUNTS = (Path("/proc"), Path("/sys"), Path("/dev"))  # ProtectSystem=strict spares them


def read_only_but(writable: list[Path], check: Path) -> Callable[[], None]:
    """ProtectSystem=strict with ReadWritePaths=, for the child that calls the returned
    function: a mount namespace of its own in which every mount is read-only but
    ``writable`` (bound onto themselves first, so they stay mounts of their own) and /proc,
    /sys and /dev. Raises OSError unless ``check`` ends up read-only. Needs root."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]

    def call(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), what)

    def spared(point: Path) -> bool:
        return any(point == p or p in point.parents for p in (*KERNEL_MOUNTS, *writable))

    def enter() -> None:
        call(libc.unshare(CLONE_NEWNS), "unshare")  # from here on, no mount is the host's
        call(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        for path in writable:
            call(libc.mount(bytes(path), bytes(path), None, MS_BIND, None), f"bind {path}")
        with open("/proc/self/mountinfo", encoding="utf-8") as table:
            mounts = [line.split() for line in table]
        for fields in mounts:
            point = Path(fields[4].encode().decode("unicode_escape"))  # \040 for a space
            if spared(point):
                continue
            flags = sum(MOUNT_OPTIONS.get(option, 0) for option in fields[5].split(","))
            # Only the mount's own flag (MS_BIND): the file system stays writable elsewhere.
            libc.mount(None, bytes(point), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
        if not os.statvfs(check).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, f"{check} is still writable")

    return enter


def start_under_unit(unit: dict[str, list[str]], tmp_path: Path, events: Events,
                     sandbox: Callable[[], None] | None = None
                     ) -> tuple[MasterProcess, socket.socket]:
    """Start the unit's ExecStart= under its seccomp filters (after ``sandbox``, if given),
    with what systemd would give it: $RUNTIME_DIRECTORY, $NOTIFY_SOCKET (the socket is
    returned), $WATCHDOG_USEC and Environment=."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (tmp_path / "state").mkdir(mode=0o700)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFORK_RUNTIME_DIR", "PREFORK_DB", "JOURNAL_STREAM")}
    env.update(RUNTIME_DIRECTORY=str(runtime), NOTIFY_SOCKET=str(tmp_path / "notify"),
               WATCHDOG_USEC="2000000")
    for assignment in unit["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%S", str(tmp_path / "state"))
    load_filters = seccomp_loader(unit)

    def preexec() -> None:
        if sandbox is not None:
            sandbox()  # before the filters, which deny mount(2) and unshare(2)
        load_filters()

    try:
        proc = subprocess.Popen(shlex.split(unit["ExecStart"][0]), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=preexec)
    except subprocess.SubprocessError as exc:
        notify.close()
        pytest.skip(f"the unit's sandbox cannot be set up here: {exc}")
    return MasterProcess(proc, events), notify


def assert_no_trouble(log: str) -> None:
    for trouble in ("Traceback", "Errno", "not permitted", "not supported", " WARNING ",
                    " ERROR ", "cannot "):
        assert trouble not in log, log


def ready_then_stopped(master: MasterProcess, notify: socket.socket) -> None:
    """READY=1 arrives (Type=notify: without it through the AF_UNIX-only filter, the start
    would time out), then SIGTERM stops the master cleanly."""
    received: list[str] = []
    while "READY=1" not in received:
        assert select.select([notify], [], [], WAIT)[0], f"no READY=1, only {received}"
        received += notify.recv(4096).decode().splitlines()
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


@needs_systemd_analyze
@pytest.mark.parametrize(("fleet", "ready"), [("demo", r"worker \S+ spawned"),
                                              ("cpu", r": polling \S+ every")])
def test_the_fleet_runs_under_the_units_seccomp_filters(
        fleet: str, ready: str, tmp_path: Path, events: Events) -> None:
    unit = directives(render_unit(fleet, venv=VENV))
    master, notify = start_under_unit(unit, tmp_path, events)
    try:
        master.wait_log(ready, count=4)
        ready_then_stopped(master, notify)
    finally:
        master.close()
        notify.close()
    assert_no_trouble(master.log)


@needs_systemd_analyze
@pytest.mark.usefixtures("textfiles_in_tmp")
def test_the_exporter_listens_and_writes_under_the_units_sandbox(
        tmp_path: Path, events: Events) -> None:
    """The exporter, spawned from the venv's python, binds its loopback port through
    RestrictAddressFamilies= and writes its textfile under ProtectSystem=strict."""
    if os.geteuid() != 0:
        pytest.skip("rebuilding ProtectSystem=strict takes a mount namespace: root only")
    textfile = tmp_path / "textfiles" / "demo.prom"
    textfile.parent.mkdir()
    unit = directives(render_unit("demo", venv=VENV, metrics=MetricsOptions(
        listen=("127.0.0.1", 0), textfile=textfile)))
    writable = [tmp_path / "run", tmp_path / "state", *map(Path, unit["ReadWritePaths"])]
    master, notify = start_under_unit(unit, tmp_path, events,
                                      read_only_but(writable, check=tmp_path))
    try:
        url = master.wait_log(r"metrics on (http://127\.0\.0\.1:\d+/metrics)").group(1)
        master.wait_log(r"metrics exporter started")
        # The master listens already: the scrape waits in the backlog for the exporter.
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            scraped = response.read().decode()
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0, master.log  # the exporter has exited too
    finally:
        master.close()
        notify.close()
    assert 'prefork_up{fleet="demo"} 1.0' in scraped, scraped
    # Its last write, as the fleet stopped: the exporter had the directory to write in.
    assert 'prefork_up{fleet="demo"}' in textfile.read_text(), master.log
    assert_no_trouble(master.log)


@needs_systemd_analyze
def test_dask_workers_run_under_the_units_seccomp_filters(tmp_path: Path, events: Events
                                                          ) -> None:
    """MemoryDenyWriteExecute=, the system call filter and the address families leave a
    Dask worker all it needs: it connects to a scheduler on loopback and stops cleanly."""
    pytest.importorskip("distributed")
    from test_dask_worker import start_scheduler

    scheduler = start_scheduler(tmp_path)
    try:
        unit = directives(render_unit("demo", venv=VENV,
                                      dask=DaskUnit(scheduler.address, nworkers=2)))
        master, notify = start_under_unit(unit, tmp_path, events)
        try:
            master.wait_log(r"Registered to: +" + re.escape(scheduler.address), count=2)
            ready_then_stopped(master, notify)
        finally:
            master.close()
            notify.close()
    finally:
        scheduler.stop()
    assert_no_trouble(master.log)
