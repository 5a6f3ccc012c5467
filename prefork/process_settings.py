"""Per-worker process settings, supervisord's and circus's: ``env``, ``cwd``, ``user``,
``group``, ``umask``, ``nice`` and ``rlimits`` of :class:`prefork.Worker`.

Two halves, so the fork path only makes system calls:

- :func:`plan_settings` runs once in the master, at load (``Fleet.validate``): it checks
  every setting, looks names up (``pwd``, ``grp``, ``os.getgrouplist``, ``RLIMIT_*``) and
  returns a frozen :class:`SettingsPlan`, or ``None`` for a worker without settings (its
  child then does nothing more at all). A bad setting is a :class:`SettingsError` whose
  text is one line.
- :func:`apply_in_child` runs in the forked child (:func:`prefork.child.run_child`):
  system calls in a fixed order, and one log line naming the worker and the setting, then
  exit :data:`~prefork.exits.ExitCode.CHILD_SETUP_FAILED` (a failed start), if one fails.

Decisions:

- ``user`` alone: its primary group, and its groups from the group database (what a login
  gets, so a worker in ``ssl-cert`` reads the keys); ``group`` names the primary group
  instead. The master's supplementary groups are always dropped. ``HOME``, ``USER`` and
  ``LOGNAME`` become the user's, as a login sets them; ``env`` may still override them.
- Numeric ids must exist in the passwd/group databases, like names.
- A master without CAP_SETUID and CAP_SETGID (not root, or root under a systemd unit's
  empty ``CapabilityBoundingSet=``) can only run its workers as itself: another
  ``user``/``group`` is refused at load, since ``setuid`` would fail in every child.
- ``env``: str values set a variable, ``None`` removes one the master has (a secret the
  worker must not see, say). prefork's own ``PREFORK_WORKER``/``PREFORK_REPLICA`` win.
- ``nice`` is absolute (``setpriority``, -20 to 19), not an increment on the master's.
- ``rlimits``: a name (case-insensitive, ``RLIMIT_`` left off: ``nofile``, ``core``,
  ``as``...) to an int for both limits or a ``(soft, hard)`` pair; ``"unlimited"`` (or
  ``resource.RLIM_INFINITY``) for no limit.
- ``cwd`` is made absolute at load, and entered after the switch of user, as that user:
  supervisord does the same, and a directory the worker's user cannot enter is a failed
  start rather than a worker that cannot read its own working directory.

Not dumpable: the kernel marks a process not dumpable when its uid changes (its memory
still holds what the master read as root), so a worker with ``user`` writes no core dump
and another process of its user cannot ptrace it. prefork leaves it so.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import resource
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from prefork.exits import ExitCode

log = logging.getLogger("prefork")

PathSetting = str | os.PathLike[str]
LimitValue = int | str
RlimitSetting = LimitValue | tuple[LimitValue, LimitValue]

# "nofile" -> resource.RLIMIT_NOFILE, for every limit this Python knows.
RLIMITS: dict[str, int] = {name[len("RLIMIT_"):].lower(): getattr(resource, name)
                           for name in dir(resource) if name.startswith("RLIMIT_")}
_UNLIMITED = ("unlimited", "infinity")
_MAX_LIMIT = 2**63 - 1  # what resource.setrlimit accepts below RLIM_INFINITY
NICE_RANGE = range(-20, 20)
_CAP_SETUID_SETGID = 1 << 7 | 1 << 6  # linux/capability.h


class SettingsError(ValueError):
    """A process setting cannot be applied. ``str()`` is one line for the user."""


@dataclass(frozen=True, slots=True)
class SettingsPlan:
    """What a child does, resolved to numbers: ``None``/empty means leave it as the master's.

    ``rlimits`` is ``(name, RLIMIT_*, (soft, hard))``; ``env`` holds ``(name, value)`` to
    set and ``unset`` the names to remove; ``groups`` are the supplementary groups.
    """

    rlimits: tuple[tuple[str, int, tuple[int, int]], ...] = ()
    nice: int | None = None
    umask: int | None = None
    groups: tuple[int, ...] | None = None
    gid: int | None = None
    uid: int | None = None
    user_name: str = ""
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    unset: tuple[str, ...] = ()


_NOTHING = SettingsPlan()


def plan_settings(
    *,
    env: Mapping[str, str | None] | None = None,
    cwd: PathSetting | None = None,
    user: str | int | None = None,
    group: str | int | None = None,
    umask: int | None = None,
    nice: int | None = None,
    rlimits: Mapping[str, RlimitSetting] | None = None,
) -> SettingsPlan | None:
    """Check the settings and resolve them for the child, in the master, once.

    ``None`` if there is nothing to do. Raises :class:`SettingsError` (one line) for an
    unknown user, group or limit, a missing ``cwd``, a value out of range, or a
    ``user``/``group`` this process could not switch to (not root: only its own).
    """
    if (env is None and cwd is None and user is None and group is None and umask is None
            and nice is None and rlimits is None):
        return None
    if nice is not None and (not _is_int(nice) or nice not in NICE_RANGE):
        raise SettingsError(f"nice must be an integer from -20 to 19, got {nice!r}")
    if umask is not None and (not _is_int(umask) or not 0 <= umask <= 0o777):
        shown = oct(umask) if _is_int(umask) else repr(umask)
        raise SettingsError(f"umask must be an integer from 0 to 0o777, got {shown}")
    variables = _env(env)
    login: dict[str, str | None] = {}
    uid = gid = groups = None
    user_name = ""
    if user is not None or group is not None:
        uid, gid, groups, user_name, home = _credentials(user, group)
        if user is not None:
            login = {"HOME": home, "USER": user_name, "LOGNAME": user_name}
    plan = SettingsPlan(
        rlimits=_rlimits(rlimits),
        nice=nice,
        umask=umask,
        groups=groups,
        gid=gid,
        uid=uid,
        user_name=user_name,
        cwd=None if cwd is None else _directory(cwd),
        env=tuple((k, v) for k, v in {**login, **variables}.items() if v is not None),
        unset=tuple(k for k, v in variables.items() if v is None),
    )
    return None if plan == _NOTHING else plan


def apply_in_child(plan: SettingsPlan, label: str) -> None:
    """Apply ``plan`` in the forked child of worker ``label``; on failure log one line
    and exit ``CHILD_SETUP_FAILED``, a failed start retried on the backoff.

    Order: limits and priority first (raising a hard limit or lowering nice needs the
    master's privileges), umask, then groups, gid, uid, and a check that ``setuid(0)``
    now fails; then ``cwd``, entered as the worker's user; the environment last.

    Called by ``run_child`` before the fleet's ``post_fork`` hook, not after it as
    gunicorn does: the hook is then run as the worker runs (its user, directory and
    environment), so what it opens or creates (a log file, a socket, a connection pool)
    is the worker's and usable by it, and no fleet code runs as root in the child.
    Privileged set-up belongs in ``on_starting``/``pre_fork``, in the master, whose
    descriptors the worker inherits. Also before ``PR_SET_PDEATHSIG``: a change of uid or
    gid clears the parent-death signal (the kernel's ``commit_creds``).

    Measured (median of 300 fresh children of a master-sized process, this 2-core box):
    all seven settings add ~0.3 ms to the child (376 against 93 us for the two
    ``PREFORK_*`` variables every child sets), nearly all of it 64-73 more copy-on-write
    page faults; one setting alone ~60 us, the ``setuid(0)`` check ~60 us. A worker
    without settings has no plan, and its child does not call this.
    """
    # Which step, as a constant: the message is built only if one fails.
    step, limit = "rlimit", None
    try:
        for limit in plan.rlimits:
            resource.setrlimit(limit[1], limit[2])
        if plan.nice is not None:
            step = "nice"
            os.setpriority(os.PRIO_PROCESS, 0, plan.nice)
        if plan.umask is not None:
            os.umask(plan.umask)
        if plan.groups is not None:
            step = "groups"
            os.setgroups(plan.groups)
        if plan.gid is not None:
            step = "group"
            os.setgid(plan.gid)
        if plan.uid is not None:
            step = "user"
            os.setuid(plan.uid)
            if plan.uid != 0:
                _check_root_is_gone(label, plan.user_name)
        if plan.cwd is not None:
            step = "cwd"
            os.chdir(plan.cwd)
        environ = os.environ
        for key, value in plan.env:
            environ[key] = value
        for key in plan.unset:
            environ.pop(key, None)
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        _fail(label, f"cannot apply {_describe(plan, step, limit)}: {reason}")


def _describe(plan: SettingsPlan, step: str, limit: tuple[str, int, tuple[int, int]] | None
              ) -> str:
    if step == "rlimit" and limit is not None:
        return f"rlimit {limit[0]} {limit[2]}"
    if step == "user":
        return f"user {plan.user_name}"
    if step == "groups":
        return f"groups {list(plan.groups or ())}"
    return f"{step} {getattr(plan, 'gid' if step == 'group' else step)}"


def _check_root_is_gone(label: str, user_name: str) -> None:
    try:
        os.setuid(0)
    except PermissionError:
        return
    _fail(label, f"user {user_name}: root could be regained after setuid (capabilities "
                 "kept?); not starting it")


def _fail(label: str, message: str) -> NoReturn:
    # The same ending as a failed post_fork: one line, then a failed start.
    log.error("worker %s: %s", label, message)
    os._exit(ExitCode.CHILD_SETUP_FAILED)


# -- at load, in the master ---------------------------------------------------------------


def _credentials(user: str | int | None, group: str | int | None
                 ) -> tuple[int | None, int | None, tuple[int, ...] | None, str, str]:
    """``(uid, gid, groups, user name, home)``; ``None`` for what the child keeps as the
    master's (all three for a master that is not root, which may only name itself)."""
    entry = None if user is None else _passwd(user)
    if group is not None:
        gid = _group_id(group)
    elif entry is not None:
        gid = entry.pw_gid
    else:  # pragma: no cover - plan_settings calls this with one of them set
        raise SettingsError("user or group must be set")
    name = entry.pw_name if entry is not None else ""
    home = entry.pw_dir if entry is not None else ""
    if not _may_switch_users():
        why = (f"the master runs as uid {os.geteuid()}, not root" if os.geteuid() != 0 else
               "the master runs as root without CAP_SETUID and CAP_SETGID (as under a "
               "systemd unit's CapabilityBoundingSet=)")
        if entry is not None and entry.pw_uid != os.geteuid():
            raise SettingsError(f"user {user!r}: {why}, so its workers can only run as its "
                                "own user")
        if gid != os.getegid():
            raise SettingsError(f"group {group!r}: {why}, so its workers can only run as "
                                "its own group")
        return None, None, None, name, home  # nothing to switch: they are the master's
    if entry is None:  # root with a group only: the master's user, no other groups
        return None, gid, (gid,), name, home
    return entry.pw_uid, gid, tuple(os.getgrouplist(entry.pw_name, gid)), name, home


def _may_switch_users() -> bool:
    """Whether this process has CAP_SETUID and CAP_SETGID in effect (root normally does;
    root in a unit with ``CapabilityBoundingSet=`` does not)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16) & _CAP_SETUID_SETGID == _CAP_SETUID_SETGID
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _passwd(user: str | int) -> pwd.struct_passwd:
    try:
        if _is_int(user):
            return pwd.getpwuid(user)  # type: ignore[arg-type]
        if isinstance(user, str) and user:
            return pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise SettingsError(f"user {user!r} does not exist") from None
    raise SettingsError(f"user must be a user name or a numeric uid, got {user!r}")


def _group_id(group: str | int) -> int:
    try:
        if _is_int(group):
            return grp.getgrgid(group).gr_gid  # type: ignore[arg-type]
        if isinstance(group, str) and group:
            return grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise SettingsError(f"group {group!r} does not exist") from None
    raise SettingsError(f"group must be a group name or a numeric gid, got {group!r}")


def _directory(cwd: object) -> str:
    try:
        path = os.path.abspath(os.fspath(cwd))  # type: ignore[call-overload]
    except TypeError:
        raise SettingsError(f"cwd must be a path, got {cwd!r}") from None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SettingsError(f"cwd {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cwd {path} cannot be checked: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISDIR(mode):
        raise SettingsError(f"cwd {path} is not a directory")
    return path


def _env(env: object) -> dict[str, str | None]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise SettingsError(f"env must be a mapping of names to str (or None), got {env!r}")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise SettingsError(f"env: {key!r} is not a variable name (a non-empty str "
                                "without '=')")
        if value is not None and (not isinstance(value, str) or "\0" in value):
            raise SettingsError(f"env {key}: the value must be a str without NUL (or None "
                                f"to remove the variable), got {value!r}")
    return dict(env)


def _rlimits(rlimits: object) -> tuple[tuple[str, int, tuple[int, int]], ...]:
    if rlimits is None:
        return ()
    if not isinstance(rlimits, Mapping):
        raise SettingsError(f"rlimits must be a mapping of limit names to values, "
                            f"got {rlimits!r}")
    planned: dict[int, tuple[str, int, tuple[int, int]]] = {}
    for key, value in rlimits.items():
        name = key.lower().removeprefix("rlimit_") if isinstance(key, str) else key
        if name not in RLIMITS:
            raise SettingsError(f"rlimits: unknown limit {key!r} (known: "
                                f"{', '.join(sorted(RLIMITS))})")
        pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
        if len(pair) != 2:
            raise SettingsError(f"rlimits {name}: expected a limit or a (soft, hard) pair, "
                                f"got {value!r}")
        soft, hard = (_limit(name, v) for v in pair)
        if _above(soft, hard):
            raise SettingsError(f"rlimits {name}: the soft limit {pair[0]!r} is above the "
                                f"hard limit {pair[1]!r}")
        if RLIMITS[name] in planned:  # "NOFILE" and "nofile", or the alias "ofile"
            raise SettingsError(f"rlimits: {key!r} sets {planned[RLIMITS[name]][0]} again")
        planned[RLIMITS[name]] = (name, RLIMITS[name], (soft, hard))
    return tuple(planned.values())


def _limit(name: str, value: object) -> int:
    if isinstance(value, str) and value.lower() in _UNLIMITED:
        return resource.RLIM_INFINITY
    if _is_int(value) and (0 <= value <= _MAX_LIMIT  # type: ignore[operator]
                           or value == resource.RLIM_INFINITY):
        return value  # type: ignore[return-value]
    raise SettingsError(f"rlimits {name}: a limit must be an integer >= 0 or 'unlimited', "
                        f"got {value!r}")


def _above(soft: int, hard: int) -> bool:
    infinity = resource.RLIM_INFINITY
    return hard != infinity and (soft == infinity or soft > hard)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
