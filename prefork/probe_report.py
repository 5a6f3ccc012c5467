"""What ``prefork probe`` reports: every sample and the summary, as the ``--json``
document (its schema is in the README) or as the table it prints."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prefork.client import preload_line
from prefork.memory import MIB, Memory
from prefork.tables import align

SCHEMA_VERSION = 1


def fleet_pss(rows: Iterable[tuple[str, int, int]]) -> int | None:
    """What the fleet (its master and children) costs in PSS, from one sample of the
    processes its master forked, each a ``(role, pss, uss)``: the fleet's PSS, plus what
    the bare fork and the sleeper (which the fleet would not have) took of the pages they
    share with it, their PSS less their USS. Without that, those two spread the floor's
    shared pages over two more processes: the cpu fleet's 8 children and master read 8.4
    MiB low. Pages only those two share would be counted as the fleet's (each writes next
    to nothing). None without a master or child."""
    fleet, beside = [], 0
    for role, pss, uss in rows:
        if role in ("master", "child"):
            fleet.append(pss)
        elif role in ("bare", "sleeper"):
            beside += pss - uss
    return sum(fleet) + beside if fleet else None


@dataclass(frozen=True)
class Sample:
    """One process's memory at one moment of the probe."""

    role: str  # "master", "child", "bare" (a bare os.fork()), "sleeper" or "baseline"
    name: str  # the worker's label, or "master"
    pid: int
    phase: str  # "idle", "working" or "live"
    at: float | None  # seconds after the children were up, for idle samples
    memory: Memory

    def as_dict(self) -> dict[str, object]:
        return {"role": self.role, "name": self.name, "pid": self.pid, "phase": self.phase,
                "at": self.at, **self.memory.as_dict()}


@dataclass
class ProbeReport:
    """Every sample and the summary; ``as_dict()`` is the documented ``--json`` document."""

    processes: list[Sample] = field(default_factory=list)
    summary: dict[str, object] = field(default_factory=dict)
    # Per child: name, pid and what it imported after the fork (prefork.after_fork's
    # report, as `status --json` has it), once its worker's warm-up ran.
    imported_after_fork: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"schema": SCHEMA_VERSION,
                "processes": [s.as_dict() for s in self.processes],
                "imported_after_fork": self.imported_after_fork,
                "summary": self.summary}


def format_report(report: ProbeReport) -> str:
    """The report as a table in MiB, then the summary in sentences."""
    rows = [("role", "name", "pid", "phase", "RSS", "USS", "PSS", "shared", "swap")]
    for s in report.processes:
        phase = s.phase if s.at is None else f"{s.phase} {s.at:g}s"
        m = s.memory
        rows.append((s.role, s.name, str(s.pid), phase,
                     *(f"{v / MIB:.1f}" for v in (m.rss, m.uss, m.pss, m.shared, m.swap))))
    lines = align(rows, right=range(4, len(rows[0])))
    lines.append("")
    lines.extend(_summary_lines(report.summary))
    lines.extend(_imported_lines(report.imported_after_fork))
    return "\n".join(lines)


def _imported_lines(children: list[dict[str, Any]]) -> list[str]:
    """What each child imported after the fork while it worked, and the ``--preload``
    line that moves it into the floor (as ``prefork status`` prints them)."""
    reports = [(str(c.get("name")), r if isinstance(r := c.get("imported_after_fork"), dict)
                and isinstance(r.get("count"), int) else None) for c in children]
    counted = [(name, r) for name, r in reports if r is not None and r["count"] > 0]
    if not counted:
        if not reports:
            return []
        if all(r is None for _, r in reports):
            return ["imported after the fork: not reported yet"]
        return ["imported after the fork: nothing" + ("" if all(r for _, r in reports)
                                                      else " (some did not report yet)")]
    lines = ["imported after the fork (USS when each reported):"]
    for name, r in counted:
        uss = r.get("uss")
        lines.append(f"  {name}: {r['count']} modules"
                     + ("" if not isinstance(uss, int) else f" ({uss / MIB:.1f} MiB)"))
    preload = preload_line(children)
    if preload:
        lines += ["To import them into the floor instead, add to `prefork run` (or run it "
                  "with --learn-floor):", f"  {preload}"]
    return lines


def _summary_lines(summary: dict[str, object]) -> list[str]:
    def mib(key: str) -> str:
        value = summary.get(key)
        return "-" if value is None else f"{value / MIB:.1f} MiB"  # type: ignore[operator]

    lines = []
    if summary.get("python") is not None:
        lines.append(f"fleet {summary['fleet']}: {summary['workers']} children, Python "
                     f"{summary['python']}, gc.freeze {'on' if summary['freeze'] else 'off'}, "
                     f"warm-up in the master {'on' if summary['warm_up'] else 'off'}; "
                     f"floor (master RSS at fork) {mib('floor_rss')}")
    else:
        lines.append(f"fleet {summary['fleet']}: master and {summary['workers']} workers, live")
    line = f"fleet PSS: {mib('prefork_pss')} under prefork"
    if summary.get("baseline_pss") is not None:
        line += (f", {mib('baseline_pss')} as {summary['workers']} fresh interpreters "
                 f"(ratio {summary['ratio']:.2f})")
    lines.append(line)
    if summary.get("working_prefork_pss") is not None:
        line = f"fleet PSS working: {mib('working_prefork_pss')} under prefork"
        if summary.get("working_baseline_pss") is not None:
            line += f", {mib('working_baseline_pss')} as fresh interpreters"
        lines.append(line)
    line = f"private memory per child (median USS): {mib('idle_private')} idle"
    if summary.get("working_private") is not None:
        line += f", {mib('working_private')} working"
    lines.append(line)
    if summary.get("bare_idle_private") is not None:
        bare = int(summary["bare_idle_private"])  # type: ignore[call-overload]
        lines.append(f"a bare os.fork() child of the same floor, idle: {bare / MIB:.2f} MiB "
                     "private")
        if summary.get("sleeper_idle_private") is not None:
            sleeper = int(summary["sleeper_idle_private"])  # type: ignore[call-overload]
            loop = int(summary["idle_private"]) - sleeper  # type: ignore[call-overload]
            lines.append(f"prefork's own cost per child: {(sleeper - bare) / MIB:+.2f} MiB (a "
                         f"prefork child that sleeps as the bare fork does); the idle loop's: "
                         f"{loop / MIB:+.2f} MiB more")
    if summary.get("probe_seconds") is not None:
        # the master, and with --bare-fork the bare fork and the sleeper
        beside = 2 if summary.get("bare_idle_private") is not None else 0
        count = int(summary["workers"]) + 1 + beside  # type: ignore[call-overload]
        lines.append(f"measuring {count} processes took "
                     f"{summary['probe_seconds'] * 1000:.1f} ms")  # type: ignore[operator]
    return lines

