"""Bad input: one line naming the problem, exit 2, no traceback, and nothing forked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Events, cli_in_child, master_env

BAD_RUNS = [
    (["--fleet", "nosuchfleet"], "unknown fleet 'nosuchfleet' (known: "),
    (["--fleet", "no_such_module_xyz:fleet"], "fleet module 'no_such_module_xyz' not found"),
    (["--fleet", "fleets.basic:nope"], "module 'fleets.basic' has no attribute 'nope'"),
    (["--fleet", "fleets.basic:not_a_fleet"], "is a int, not a fleet"),
    (["--fleet", "fleets.basic:empty"], "fleet 'empty' has no workers"),
    (["--fleet", "fleets.basic:uncallable"], "worker 'w': 17 is not callable"),
    (["--fleet", "fleets.lean:fleet", "--learn-floor", "--report-imports-after", "0"],
     "--learn-floor learns from the workers' reports: --report-imports-after must be more "
     "than 0"),
    (["--fleet", "fleets.basic:sleepers", "--probe-fd", "99"],
     "--probe-fd 99: Bad file descriptor (it is for prefork probe alone)"),
    (["--fleet", "fleets.basic:sleepers", "--probe-workers", "2"],
     "--probe-workers and --probe-bare need --probe-fd"),
    (["--fleet", "fleets.basic:needs_args"], "takes arguments"),
    (["--fleet", "fleets.basic:bad_name"], "worker name 'has space' must be"),
    (["--fleet", "fleets.basic:bad_replicas"], "replicas must be an integer >= 1"),
    (["--fleet", "fleets.basic:bad_policy"], "restart must be one of"),
    (["--fleet", "fleets.basic:duplicate"], "two workers are named 'w'"),
    (["--fleet", "fleets.broken_import:fleet"], "RuntimeError: database URL is not set"),
    (["--fleet", "fleets.basic:sleepers", "--preload", "no_such_mod_q"],
     "preload module 'no_such_mod_q' not found"),
    (["--fleet", "fleets.basic:sleepers", "--grace", "-1"], "'--grace'"),
    (["--fleet", "fleets.basic:sleepers", "--grace", "soon"], "not a number of seconds"),
    (["--fleet", "fleets.basic:sleepers", "--max-backoff", "nan"], "finite number"),
    (["--fleet", "fleets.basic:sleepers", "--start-limit-burst", "0"], "'--start-limit-burst'"),
    (["--fleet", "fleets.basic:sleepers", "--start-limit-interval", "-5"], "'--start-limit-"),
    (["--fleet", "fleets.basic:sleepers", "--restart", "sometimes"], "'--restart'"),
    (["--fleet", "fleets.basic:sleepers", "--bogus"], "No such option"),
    (["--fleet", "fleets.basic:sleepers", "--max-private-memory", "lots"], "is not a size"),
    (["--fleet", "fleets.basic:sleepers", "--memory-check-interval", "0"],
     "'--memory-check-interval': '0' must be more than 0 seconds"),
    (["--fleet", "fleets.basic:bad_timeout"], "timeout must be a number of seconds > 0"),
    (["--fleet", "fleets.basic:bad_max_replicas"], "max_replicas must be an integer >= "
                                                   "replicas (2)"),
    (["--fleet", "fleets.basic:bad_memory_limit"], "max_private_memory must be a number of "
                                                   "bytes > 0"),
    (["--fleet", "fleets.basic:bad_warmup"], "warmup <lambda> takes arguments"),
    ([], "Missing option '--fleet'"),
    # Durations past a week: the master's select() would overflow at ~24.8 days.
    (["--fleet", "fleets.basic:sleepers", "--grace", "3000000"],
     "'--grace': '3000000' is more than 604800 seconds (7 days)"),
    (["--fleet", "fleets.basic:sleepers", "--grace", "1e10"], "'--grace': '1e10' is more than"),
    (["--fleet", "fleets.basic:sleepers", "--memory-check-interval", "1e10"],
     "'--memory-check-interval': '1e10' is more than"),
    (["--fleet", "fleets.basic:sleepers", "--max-backoff", "604801"], "'--max-backoff'"),
    (["--fleet", "fleets.basic:sleepers", "--backoff-reset", "1e9"], "'--backoff-reset'"),
    (["--fleet", "fleets.basic:sleepers", "--start-limit-interval", "1e9"],
     "'--start-limit-interval'"),
    (["--fleet", "fleets.limits:endless_backoff"], "backoff initial must be a number of seconds "
                                                   ">= 0 and at most 604800 (7 days), got inf"),
    (["--fleet", "fleets.limits:long_timeout"], "timeout must be a number of seconds > 0 and "
                                                "at most 604800 (7 days), got 10000000000.0"),
    (["--fleet", "fleets.limits:long_start_limit"], "start limit interval must be"),
    # How many: one heartbeat cell, and one slot, per worker process.
    (["--fleet", "fleets.limits:huge_replicas"], "replicas must be an integer >= 1 and at "
                                                 "most 1024, got 1000000000"),
    (["--fleet", "fleets.limits:huge_max_replicas"], "max_replicas must be an integer >= "
                                                     "replicas (1) and at most 1024, got 1025"),
    (["--fleet", "fleets.limits:too_many"], "fleet 'many' may run 1025 worker processes (its "
                                            "workers' max_replicas, or replicas, added up); "
                                            "at most 1024 are allowed"),
    # Whatever the user's module or mapping raises while it is read.
    (["--fleet", "fleets.odd_import:fleet"], "fleet module 'fleets.odd_import' failed to "
                                             "import: Unusual: the floor gave up (at "),
    (["--fleet", "fleets.unreadable:fleet"], "fleet 'fleets.unreadable.fleet' cannot be read: "
                                             "RuntimeError: the worker table is not loaded "
                                             "(at "),
]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``prefork run ARGS`` to its end, with its output."""
    return subprocess.run([sys.executable, "-m", "prefork", "run", *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize(("args", "message"), BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, events: Events,
                                          runtime_dir: Path, tmp_path: Path) -> None:
    # A forked child runs the CLI (cli_in_child): the same answer as `python -m prefork`
    # gives (the tests below start that), 45 interpreters fewer.
    result = cli_in_child(["run", *args],
                          master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prefork: error: ")
    assert message in lines[0]
    events.drain()
    assert not events.of("up"), "a worker ran although the input was bad"


def test_unsafe_runtime_dir_is_refused(events: Events, runtime_dir: Path,
                                       tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = _run(["--fleet", "fleets.basic:sleepers", "--runtime-dir", str(shared)],
                  master_env(events, runtime_dir))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"prefork: error: runtime directory {shared} is writable by others; "
        "use a private one (--runtime-dir)"
    ]


def test_bare_prefork_shows_its_help_not_an_error_line() -> None:
    result = subprocess.run([sys.executable, "-m", "prefork"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2  # click's code for "no command given"
    assert result.stderr.startswith("Usage: prefork [OPTIONS] COMMAND")
    assert "\n  run " in result.stderr and "error" not in result.stderr


def test_unknown_command_and_help() -> None:
    bad = subprocess.run([sys.executable, "-m", "prefork", "frobnicate"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["prefork: error: No such command 'frobnicate'."]
    ok = subprocess.run([sys.executable, "-m", "prefork", "run", "--help"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0
    assert "--max-backoff" in ok.stdout


def test_a_symlinked_runtime_dir_is_refused_and_its_target_untouched(
        events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    result = _run(["--fleet", "fleets.basic:sleepers", "--runtime-dir", str(link)],
                  master_env(events, runtime_dir))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"prefork: error: runtime directory {link} is not a directory (a symlink); "
        "use a private one (--runtime-dir)"
    ]
    assert list(target.iterdir()) == []


def test_ctrl_c_while_the_fleet_imports_exits_130_quietly(events: Events, runtime_dir: Path,
                                                          tmp_path: Path) -> None:
    """A KeyboardInterrupt during the import is Ctrl-C, not a configuration error."""
    result = _run(["--fleet", "fleets.interrupted_import:fleet"],
                  master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    assert (result.returncode, result.stderr.strip()) == (130, "")  # click ends ^C's line
