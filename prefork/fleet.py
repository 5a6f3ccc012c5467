"""Fleet and worker specs, and loading a fleet by name or by ``module:ATTR``.

A fleet is what the master forks: named workers, each a zero-argument callable that
blocks while the worker runs. Everything here happens in the master before any fork;
every problem is reported as :class:`FleetError` with one line that names it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from prefork.heartbeats import HEARTBEAT_CAPACITY, beat_interval, beat_while_the_loop_runs
from prefork.paths import name_for_spec, name_problem
from prefork.process_settings import (
    PathSetting,
    RlimitSetting,
    SettingsError,
    SettingsPlan,
    plan_settings,
)
from prefork.readiness import find_cycle

if TYPE_CHECKING:
    from importlib import metadata

WorkerTarget = Callable[[], object]
RestartPolicy = Literal["on-failure", "always", "never"]
RESTART_POLICIES: tuple[str, ...] = get_args(RestartPolicy)
# Seconds between SIGTERM and SIGKILL when the master stops a worker or the whole fleet.
DEFAULT_GRACE = 15.0
# Seconds between two reads of the private memory of workers with a limit (~1 ms each).
DEFAULT_MEMORY_CHECK_INTERVAL = 10.0
ENTRY_POINT_GROUP = "prefork.fleets"
# The longest duration a user may give (grace, backoff, timeouts, intervals): a week, far
# beyond any sensible one and far below the ~24.8 days (2**31 ms) past which the master's
# select() would raise OverflowError.
MAX_SECONDS = 7 * 24 * 3600.0
# The most worker processes a fleet may run at once: its workers' max_replicas (or
# replicas) added up. Each may need a cell of the master's heartbeat table.
MAX_WORKERS = HEARTBEAT_CAPACITY
POOL_WORKER = "kernel-pool"  # the kernel pool's processes (prefork.kernel_pool)


class FleetError(Exception):
    """A fleet cannot be loaded or is not valid. ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Backoff:
    """When to restart a worker that died.

    The n-th consecutive restart waits ``min(maximum, initial * factor**(n-1))`` seconds,
    less a random part of up to ``jitter`` of it, so workers that died together do not
    come back in lockstep and no delay ever exceeds ``maximum``. A child that stayed up
    ``reset_after`` seconds counts as healthy: its next restart is the first again.
    """

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1
    reset_after: float = 60.0

    def check(self, where: str) -> None:
        check_seconds(f"{where}: backoff initial", self.initial)
        check_seconds(f"{where}: backoff maximum", self.maximum)
        check_seconds(f"{where}: backoff reset_after", self.reset_after)
        if not _is_number(self.factor) or not 1 <= self.factor < math.inf:
            raise FleetError(f"{where}: backoff factor must be a finite number >= 1, "
                             f"got {self.factor!r}")
        if not _is_number(self.jitter) or not 0 <= self.jitter < 1:
            raise FleetError(f"{where}: backoff jitter must be in [0, 1), got {self.jitter!r}")


@dataclass(frozen=True)
class StartLimit:
    """The flap limit: a worker started more than ``burst`` times within ``interval``
    seconds is marked failed and left stopped. ``interval == 0`` disables the limit.

    Why not systemd's 5 in 10 s: with exponential backoff from 1 s, five starts take at
    least 15 s, so that limit could never trip. Five starts in 60 s gives a worker that
    dies at once five tries (about 15 s) before it is marked failed.
    """

    burst: int = 5
    interval: float = 60.0

    def check(self, where: str) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise FleetError(f"{where}: start limit burst must be an integer >= 1, "
                             f"got {self.burst!r}")
        check_seconds(f"{where}: start limit interval", self.interval)


@dataclass(frozen=True)
class Worker:
    """One named worker: ``target()`` runs in a forked child and blocks while it works.

    ``None`` for ``restart``, ``backoff`` or ``start_limit`` means the fleet's setting.
    An ``async def`` target is run with :func:`asyncio_worker` automatically: SIGTERM
    and SIGINT cancel it, and it exits 0 once its clean-up is done.
    ``warmup``, if given, runs the worker's real code once on sample data and returns:
    ``prefork probe`` calls it to measure a working child.
    ``timeout``: a worker that has not called :func:`prefork.heartbeat` for this many
    seconds is stopped and restarted (async workers run by prefork beat on their own);
    ``None``: no heartbeat expected. ``max_private_memory`` (bytes, ``None``: the
    fleet's): restart the worker gracefully when its USS stays above it.
    ``max_replicas``: SIGTTIN/SIGTTOU and ``prefork scale`` may run between 1 and this
    many replicas of it; ``None``: its replica count is fixed.
    ``max_age`` (seconds, ``None``: the fleet's): replace the worker gracefully once it has
    run this long plus a jitter drawn anew for each run, uniform up to ``max_age_jitter``
    (``None``: a tenth of ``max_age``), so that workers started together are not all
    replaced together (:class:`prefork.watches.AgeWatch`).
    ``after``: names of workers of the fleet this one starts after, once each is ready
    (:func:`prefork.ready`, its first :func:`prefork.heartbeat`, or a clean exit its
    policy does not restart; every replica) - :mod:`prefork.readiness`.
    ``env``, ``cwd``, ``user``, ``group``, ``umask``, ``nice``, ``rlimits``: the worker's
    process settings, applied in its child before ``post_fork`` and its code
    (:mod:`prefork.process_settings`); ``None``: the master's.
    """

    name: str
    target: WorkerTarget
    replicas: int = 1
    restart: RestartPolicy | None = None
    backoff: Backoff | None = None
    start_limit: StartLimit | None = None
    warmup: WorkerTarget | None = None
    timeout: float | None = None
    max_private_memory: int | None = None
    max_replicas: int | None = None
    # Recycling by age.
    max_age: float | None = None
    max_age_jitter: float | None = None
    # Start order.
    after: Sequence[str] = ()
    # Process settings (prefork.process_settings). process_plan is what the child applies:
    # resolved from the others by Fleet.validate() in the master; None: nothing to apply.
    env: Mapping[str, str | None] | None = field(default=None, hash=False)
    cwd: PathSetting | None = None
    user: str | int | None = None
    group: str | int | None = None
    umask: int | None = None
    nice: int | None = None
    rlimits: Mapping[str, RlimitSetting] | None = field(default=None, hash=False)
    process_plan: SettingsPlan | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.after, list | tuple | set | frozenset):  # kept hashable, in order
            object.__setattr__(self, "after", tuple(self.after))
        if inspect.iscoroutinefunction(self.target):
            object.__setattr__(self, "target", asyncio_worker(self.target))
        if inspect.iscoroutinefunction(self.warmup):
            object.__setattr__(self, "warmup", asyncio_worker(self.warmup))  # type: ignore[arg-type]


# Each hook and the arguments it is given. Where and when each runs: the README's table
# (on_starting, pre_fork, worker_exit and on_exit in the master; post_fork in the worker).
HOOKS: dict[str, tuple[str, ...]] = {
    "on_starting": ("fleet",),
    "pre_fork": ("worker",),
    "post_fork": ("worker",),
    "worker_exit": ("worker", "status"),
    "on_exit": ("fleet",),
}


@dataclass(frozen=True)
class Fleet:
    """A named set of workers and the defaults they share.

    ``restart`` is ``"on-failure"`` (restart after a non-zero exit or a signal; a clean
    exit 0 ends the worker), ``"always"`` or ``"never"``. ``max_private_memory`` and
    ``max_age`` are the limits for workers that set none. The hooks are plain callables,
    ``None`` for none; :data:`HOOKS` says what each is given. ``groups`` maps a group name
    to the ``async def`` workers that one process hosts, each under its own supervision
    loop (:mod:`prefork.groups`); every other worker has a process of its own.
    ``kernel_workers``: the processes of the fleet's kernel pool (:mod:`prefork.kernel_pool`),
    0 for none; the master adds them as one more worker, ``kernel-pool``. ``offload``: a
    Dask scheduler's address (``tcp://HOST:PORT``) that the workers' kernels go to, and
    ``offload_fallback`` what a kernel does when it cannot be reached: run ``"local"``
    (pool or inline) or fail with an ``"error"`` (:mod:`prefork.dask_offload`).
    """

    name: str
    workers: tuple[Worker, ...]
    restart: RestartPolicy = "on-failure"
    backoff: Backoff = field(default_factory=Backoff)
    start_limit: StartLimit = field(default_factory=StartLimit)
    max_private_memory: int | None = None
    max_age: float | None = None
    kernel_workers: int = 0
    offload: str | None = None
    offload_fallback: Literal["local", "error"] = "local"
    # Hooks (see HOOKS), gunicorn's names. A worker is a prefork.WorkerContext.
    on_starting: Callable[[Fleet], object] | None = None
    pre_fork: Callable[[Any], object] | None = None
    post_fork: Callable[[Any], object] | None = None
    worker_exit: Callable[[Any, Any], object] | None = None
    on_exit: Callable[[Fleet], object] | None = None
    # Worker groups (prefork.groups): group name -> the async workers one process hosts.
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Accept any iterable of workers but keep the frozen dataclass hashable.
        object.__setattr__(self, "workers", tuple(self.workers))

    def validate(self) -> Fleet:
        """Return ``self`` if every worker is runnable, else raise :class:`FleetError`."""
        problem = name_problem(self.name)
        if problem is not None:
            raise FleetError(problem)
        if not self.workers:
            raise FleetError(f"fleet {self.name!r} has no workers")
        _check_restart(f"fleet {self.name!r}", self.restart)
        self.backoff.check(f"fleet {self.name!r}")
        self.start_limit.check(f"fleet {self.name!r}")
        _check_size(f"fleet {self.name!r}: max_private_memory", self.max_private_memory)
        if self.max_age is not None:
            check_seconds(f"fleet {self.name!r}: max_age", self.max_age, positive=True)
        for hook, arguments in HOOKS.items():
            _check_hook(f"fleet {self.name!r}: {hook}", getattr(self, hook), arguments)
        seen: set[str] = set()
        for worker in self.workers:
            if not isinstance(worker, Worker):
                raise FleetError(f"fleet {self.name!r}: {worker!r} is not a prefork.Worker")
            _check_worker(worker)
            if worker.name in seen:
                raise FleetError(f"fleet {self.name!r}: two workers are named {worker.name!r}")
            seen.add(worker.name)
        _check_start_order(self.name, self.workers)
        if not isinstance(self.groups, Mapping) or self.groups:
            from prefork.groups import check_groups  # imports this module: not at the top

            check_groups(self)
        if not _is_count(self.kernel_workers, 0):
            raise FleetError(f"fleet {self.name!r}: kernel_workers must be an integer >= 0 "
                             f"and at most {MAX_WORKERS}, got {self.kernel_workers!r}")
        if self.kernel_workers and POOL_WORKER in seen:
            raise FleetError(f"fleet {self.name!r}: worker {POOL_WORKER!r} has the name of "
                             "the kernel pool's processes; rename it")
        if self.offload is not None:
            from prefork.dask_offload import FALLBACKS  # fleets that offload only
            from prefork.dask_worker import scheduler_problem

            problem = (scheduler_problem(self.offload) if isinstance(self.offload, str)
                       else f"a scheduler address, got {self.offload!r}")
            if problem is not None:
                raise FleetError(f"fleet {self.name!r}: offload: {problem}")
            if self.offload_fallback not in FALLBACKS:
                raise FleetError(f"fleet {self.name!r}: offload_fallback must be one of "
                                 f"{', '.join(FALLBACKS)}, got {self.offload_fallback!r}")
        most = sum(w.max_replicas or w.replicas for w in self.workers) + self.kernel_workers
        if most > MAX_WORKERS:
            raise FleetError(f"fleet {self.name!r} may run {most} worker processes (its "
                             f"workers' max_replicas, or replicas, added up); at most "
                             f"{MAX_WORKERS} are allowed")
        return self


def replica_label(name: str, replica: int) -> str:
    """What logs, titles and status call a replica: ``indexer``, ``indexer.1``, ..."""
    return name if replica == 0 else f"{name}.{replica}"


def asyncio_worker(func: Callable[[], Any]) -> WorkerTarget:
    """Wrap an ``async def`` worker so the child runs it in a fresh event loop, where
    SIGTERM and SIGINT cancel it and let its clean-up run (:mod:`prefork.aio`): a worker
    that lets that cancellation through returns ``None``, so its child exits 0.

    Imports asyncio here, where the fleet is defined: in the master, so that its workers
    share it. A fleet of plain functions never needs it, and its master saves the 5.9 MiB
    asyncio costs by itself."""
    from prefork.aio import run_until_stopped

    @functools.wraps(func)
    def run() -> object:
        return run_until_stopped(_beating(func))

    # Said explicitly, not guessed from __wrapped__ (any decorator sets that): a worker
    # group runs the coroutine function itself (prefork.groups).
    run.prefork_coroutine = func  # type: ignore[attr-defined]
    return run


def coroutine_of(target: object) -> Callable[[], Any] | None:
    """The ``async def`` function an :func:`asyncio_worker` target runs, else ``None``."""
    return getattr(target, "prefork_coroutine", None)


async def _beating(func: Callable[[], Any]) -> object:
    """Run ``func()``; a worker with a heartbeat timeout beats from its event loop."""
    import asyncio  # imported already: this runs in its event loop

    interval = beat_interval()
    if interval is None:
        return await func()
    beats = asyncio.create_task(beat_while_the_loop_runs(interval))
    try:
        return await func()
    finally:
        beats.cancel()


def as_fleet(obj: object, name: str) -> Fleet:
    """Turn what a user wrote into a validated :class:`Fleet`.

    Accepted: a ``Fleet``; a mapping of worker name to zero-argument callable (or to a
    ``Worker``); an iterable of ``Worker``. ``name`` names the fleet when ``obj`` does not.
    Whatever the user's objects raise while they are read (a mapping whose ``items()``
    fails, say) is a :class:`FleetError` too; KeyboardInterrupt still means Ctrl-C.
    """
    try:
        return _as_fleet(obj, name)
    except (FleetError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise FleetError(f"fleet {name!r} cannot be read: {_describe(exc)}") from None


def _as_fleet(obj: object, name: str) -> Fleet:
    if isinstance(obj, Fleet):
        return obj.validate()
    if isinstance(obj, Mapping):
        workers = []
        for key, value in obj.items():
            if isinstance(value, Worker):
                if value.name != key:
                    raise FleetError(f"worker {value.name!r} is filed under the key {key!r}")
                workers.append(value)
            else:
                workers.append(Worker(name=key, target=value))
        return Fleet(name=name, workers=tuple(workers)).validate()
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes):
        items = list(obj)
        if all(isinstance(item, Worker) for item in items):
            return Fleet(name=name, workers=tuple(items)).validate()
    raise FleetError(
        f"{name!r} is a {type(obj).__name__}, not a fleet: expected a prefork.Fleet, "
        "a mapping of worker name to callable, or a list of prefork.Worker"
    )


def registered_fleets() -> dict[str, metadata.EntryPoint]:
    """Fleets registered under the ``prefork.fleets`` entry point group, by name.
    (importlib.metadata is imported here: 3.7 MiB that a ``module:ATTR`` fleet's master
    never needs.)"""
    from importlib import metadata

    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_fleet(spec: str) -> Fleet:
    """Import and validate the fleet named by ``spec``: a registered name or ``module:ATTR``.

    Importing the fleet imports the floor its workers need; that is the point of doing
    it once, here, in the master. Any exception it raises is a configuration error.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise FleetError(f"fleet {spec!r} must look like package.module:ATTR")
        module = import_module(module_name, what="fleet module")
        obj: object = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise FleetError(f"module {module_name!r} has no attribute {attr!r}") from None
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a module __getattr__ or a property that fails
                raise FleetError(f"fleet {spec!r} cannot be read: {_describe(exc)}") from None
        return as_fleet(obj, name=name_for_spec(spec))
    known = registered_fleets()
    if spec not in known:
        names = ", ".join(sorted(known)) or "none registered"
        raise FleetError(f"unknown fleet {spec!r} (known: {names}; or use module:ATTR)")
    entry_point = known[spec]
    try:
        obj = entry_point.load()
    except ModuleNotFoundError as exc:
        if entry_point.extras and entry_point.dist is not None:  # "name = module:attr [cpu]"
            wanted = f"{entry_point.dist.name}[{','.join(entry_point.extras)}]"
            raise FleetError(f"fleet {spec!r} needs the packages of {wanted} ({exc}): "
                             f"pip install '{wanted}'") from None
        raise FleetError(f"fleet {spec!r} failed to import: {_describe(exc)}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise FleetError(f"fleet {spec!r} failed to import: {_describe(exc)}") from None
    return as_fleet(obj, name=spec)


def import_module(name: str, *, what: str = "module") -> Any:
    """Import ``name``; any failure, including whatever the module raises as it is imported
    (SystemExit, a BaseException of its own), is a FleetError - but KeyboardInterrupt,
    which is what Ctrl-C during a slow import raises: it goes on to mean Ctrl-C."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise FleetError(f"{what} {name!r} not found") from None
        raise FleetError(f"{what} {name!r} failed to import: {_describe(exc)}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise FleetError(f"{what} {name!r} failed to import: {_describe(exc)}") from None


def _check_worker(worker: Worker) -> None:
    where = f"worker {worker.name!r}"
    problem = name_problem(worker.name, "worker")
    if problem is not None:
        raise FleetError(problem)
    if not callable(worker.target):
        raise FleetError(f"{where}: {worker.target!r} is not callable")
    if _required_arguments(worker.target):
        raise FleetError(f"{where}: {_callable_name(worker.target)} takes arguments; "
                         "a worker must be a zero-argument callable")
    if not _is_count(worker.replicas, 1):
        raise FleetError(f"{where}: replicas must be an integer >= 1 and at most "
                         f"{MAX_WORKERS}, got {worker.replicas!r}")
    if worker.warmup is not None:
        if not callable(worker.warmup):
            raise FleetError(f"{where}: warmup {worker.warmup!r} is not callable")
        if _required_arguments(worker.warmup):
            raise FleetError(f"{where}: warmup {_callable_name(worker.warmup)} takes "
                             "arguments; it must be a zero-argument callable")
    if worker.timeout is not None:
        check_seconds(f"{where}: timeout", worker.timeout, positive=True)
    _check_size(f"{where}: max_private_memory", worker.max_private_memory)
    if worker.max_replicas is not None and not _is_count(worker.max_replicas, worker.replicas):
        raise FleetError(f"{where}: max_replicas must be an integer >= replicas "
                         f"({worker.replicas}) and at most {MAX_WORKERS}, "
                         f"got {worker.max_replicas!r}")
    if worker.max_age is not None:
        check_seconds(f"{where}: max_age", worker.max_age, positive=True)
    if worker.max_age_jitter is not None:
        check_seconds(f"{where}: max_age_jitter", worker.max_age_jitter)
    if worker.restart is not None:
        _check_restart(where, worker.restart)
    if worker.backoff is not None:
        worker.backoff.check(where)
    if worker.start_limit is not None:
        worker.start_limit.check(where)
    _check_process_settings(worker, where)


def _check_process_settings(worker: Worker, where: str) -> None:
    """Check the worker's process settings and resolve them, once, into the plan its
    children apply (names looked up here, in the master, not after each fork)."""
    try:
        plan = plan_settings(env=worker.env, cwd=worker.cwd, user=worker.user,
                             group=worker.group, umask=worker.umask, nice=worker.nice,
                             rlimits=worker.rlimits)
    except SettingsError as exc:
        raise FleetError(f"{where}: {exc}") from None
    object.__setattr__(worker, "process_plan", plan)


def _check_start_order(fleet: str, workers: Sequence[Worker]) -> None:
    """Every ``after`` names other workers of the fleet, and nobody waits for itself
    through others: a cycle is reported as the path around it."""
    names = {w.name for w in workers}
    for worker in workers:
        where = f"worker {worker.name!r}"
        if not isinstance(worker.after, tuple) or not all(isinstance(n, str)
                                                          for n in worker.after):
            raise FleetError(f"{where}: after must be a list of worker names, "
                             f"got {worker.after!r}")
        for name in worker.after:
            if name == worker.name:
                raise FleetError(f"{where}: after names the worker itself")
            if name not in names:
                raise FleetError(f"{where}: after names {name!r}, which is not a worker of "
                                 f"fleet {fleet!r}")
    cycle = find_cycle({w.name: w.after for w in workers})
    if cycle is not None:
        raise FleetError(f"fleet {fleet!r}: workers wait for each other in a cycle: "
                         f"{' -> '.join(cycle)} (each starts after the next)")


def _check_hook(where: str, hook: object, arguments: tuple[str, ...]) -> None:
    if hook is None:
        return
    if not callable(hook):
        raise FleetError(f"{where}: {hook!r} is not callable")
    try:
        inspect.signature(hook).bind(*arguments)
    except TypeError:
        raise FleetError(f"{where}: {_callable_name(hook)} must take {len(arguments)} "
                         f"positional argument{'s' if len(arguments) > 1 else ''} "
                         f"({', '.join(arguments)})") from None
    except ValueError:  # a builtin without a signature: trust it
        pass


def _check_size(what: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
        raise FleetError(f"{what} must be a number of bytes > 0, got {value!r}")


def parse_size(text: str) -> int:
    """``"256M"``, ``"1.5G"``, ``"4096"``, ``"512MiB"``: bytes, in powers of 1024, as
    systemd reads MemoryMax=. Raises ValueError with a one-line message."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size (like 512M, 1.5G or 4096)")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1024 ** " KMGT".index(unit or " "))
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return size


def _check_restart(where: str, policy: object) -> None:
    if policy not in RESTART_POLICIES:
        raise FleetError(f"{where}: restart must be one of {', '.join(RESTART_POLICIES)}, "
                         f"got {policy!r}")


def _required_arguments(func: Callable[..., object]) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return []
    return [
        p.name for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                               p.KEYWORD_ONLY)
    ]


def _callable_name(func: object) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def check_seconds(what: str, value: object, *, positive: bool = False) -> None:
    """Raise :class:`FleetError` unless ``value`` is a number of seconds from 0 (excluded
    if ``positive``) to :data:`MAX_SECONDS`: every duration a user gives is checked so."""
    if (not _is_number(value) or value > MAX_SECONDS  # type: ignore[operator]
            or (value <= 0 if positive else value < 0)):  # type: ignore[operator]
        raise FleetError(f"{what} must be a number of seconds {'> 0' if positive else '>= 0'} "
                         f"and at most {MAX_SECONDS:g} (7 days), got {value!r}")


def _is_count(value: object, least: int) -> bool:
    """An int (not a bool) from ``least`` to :data:`MAX_WORKERS`."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and least <= value <= MAX_WORKERS)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def exception_line(exc: BaseException) -> str:
    """``Type: message`` on one line, whatever the exception's ``__str__`` does."""
    try:
        message = " ".join(str(exc).split())
    except Exception:  # its __str__ fails too
        message = "(its message cannot be shown)"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line)`` for the innermost frame: one line, no traceback."""
    text = exception_line(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    user_frames = [f for f in frames if "importlib" not in f.filename]
    if user_frames:
        last = user_frames[-1]
        text += f" (at {last.filename}:{last.lineno})"
    return text
