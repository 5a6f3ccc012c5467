"""Workers with process settings (``prefork.process_settings``): each reports how it runs.

``PREFORK_TEST_OPEN_DIR`` is a directory that ``nobody`` may enter (0711, under /tmp): the
workers' working directory, next to the events FIFO they write to.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker, WorkerContext

OPEN_DIR = os.environ.get("PREFORK_TEST_OPEN_DIR", "/nonexistent-open-dir")


def report() -> None:
    try:
        os.setuid(0)
    except PermissionError:
        regained = False
    else:
        regained = True
    umask = os.umask(0)
    os.umask(umask)
    emit("settings", cwd=os.getcwd(), uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(),
         groups=os.getgroups(), regained=regained, umask=umask,
         nice=os.getpriority(os.PRIO_PROCESS, 0),
         nofile=resource.getrlimit(resource.RLIMIT_NOFILE),
         core=resource.getrlimit(resource.RLIMIT_CORE),
         env={k: os.environ.get(k) for k in ("SETTINGS_VAR", "PREFORK_TEST_DROPPED", "HOME",
                                             "USER", "LOGNAME", "PREFORK_WORKER")})
    idle_forever()


def post_fork(worker: WorkerContext) -> None:
    emit("post_fork", uid=os.getuid(), cwd=os.getcwd(), var=os.environ.get("SETTINGS_VAR"))


as_nobody = Fleet("as_nobody", [Worker(
    "w", report, user="nobody", cwd=OPEN_DIR, umask=0o027, nice=7,
    env={"SETTINGS_VAR": "from the fleet", "PREFORK_TEST_DROPPED": None, "USER": "mine"},
    rlimits={"NOFILE": (256, 512), "core": 0},
)], post_fork=post_fork)

# Valid at load, failing in the child: a failed start, one log line.
cwd_denied = Fleet("cwd_denied", [Worker("w", report, user="nobody",
                                         cwd=os.path.join(OPEN_DIR, "private"))],
                   restart="never")
_NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())
nofile_above_nr_open = Fleet("nofile_above_nr_open", [  # more than even root may have
    Worker("w", report, rlimits={"nofile": _NR_OPEN + 1})], restart="never")

# Refused at load.
unknown_user = [Worker("w", report, user="no-such-user-q")]
unknown_uid = [Worker("w", report, user=4_000_000_000)]
unknown_group = [Worker("w", report, user="nobody", group="no-such-group-q")]
missing_cwd = [Worker("w", report, cwd="/nonexistent/settings-dir")]
cwd_is_a_file = [Worker("w", report, cwd="/etc/passwd")]
unknown_rlimit = [Worker("w", report, rlimits={"nofiles": 10})]
soft_above_hard = [Worker("w", report, rlimits={"nofile": (600, 500)})]
negative_rlimit = [Worker("w", report, rlimits={"core": -5})]
twice_the_same_rlimit = [Worker("w", report, rlimits={"nofile": 10, "NOFILE": 20})]
nice_out_of_range = [Worker("w", report, nice=20)]
umask_out_of_range = [Worker("w", report, umask=0o1000)]
env_key_not_str = [Worker("w", report, env={1: "x"})]  # type: ignore[dict-item]
env_value_not_str = [Worker("w", report, env={"PORT": 8080})]  # type: ignore[dict-item]
as_root = [Worker("w", report, user="root")]
as_root_group = [Worker("w", report, group="root")]
