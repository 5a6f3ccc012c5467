"""Which pages prefork's set-up of a child costs, counted page by page.

``python measurements/child_pages.py [--fleet cpu] [--runs 7] [--idle 1]`` (as root:
``/proc/kpagecount`` is root's). Each run starts the master ``prefork probe --bare-fork``
starts (a real ``prefork run``, :class:`prefork.probe_measure.ProbedMaster`), which forks
a bare ``os.fork()`` child that only sleeps and, first in its batch, a sleeper: a prefork
child set up as every worker is that then sleeps the same way. ``--idle`` seconds after
both are up, every present page of each is looked up in ``/proc/PID/pagemap`` and its
frame's map count in ``/proc/kpagecount``: a page mapped once is the process's own (what
its USS counts). The sleeper's own pages less the bare fork's are prefork's cost per
child, in pages; the sleeper's own pages at addresses where the bare fork's page is still
the master's say where that cost lies (which mapping). Prints the runs and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections import Counter

from prefork.probe_measure import ProbedMaster, ProbeError

PAGE = 4096
_PRESENT = 1 << 63
_PFN = (1 << 55) - 1


def frames(pid: int) -> dict[int, tuple[str, int]]:
    """Every present page of ``pid``: its address -> (mapping's name, frame number)."""
    found = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5].rsplit("/", 1)[-1] if len(fields) > 5 else "[anon]"
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((end - start) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry & _PRESENT:
                    found[start + i * PAGE] = (name, entry & _PFN)
    return found


def own(pages: dict[int, tuple[str, int]]) -> set[int]:
    """The addresses of ``pages`` whose frame is mapped once: the process's own."""
    mine = set()
    with open("/proc/kpagecount", "rb") as counts:
        for address, (_, frame) in pages.items():
            counts.seek(frame * 8)
            if struct.unpack("<Q", counts.read(8))[0] == 1:
                mine.add(address)
    return mine


def one_run(fleet: str, idle: float) -> tuple[int, int, Counter[str]]:
    """The bare fork's own pages, the sleeper's, and where the sleeper's extra ones are."""
    master = ProbedMaster(fleet, None, freeze=True, warm_up=False, bare=True)
    try:
        _, _, _, _, fds = master.receive_children()
        master.go()
        bare_pid, sleeper_pid = master.receive_sleepers(fds[0], fds[1])
        time.sleep(idle)
        bare, sleeper, at_master = frames(bare_pid), frames(sleeper_pid), frames(master.pid)
        bare_own, sleeper_own = own(bare), own(sleeper)
    finally:
        master.stop(relay_log=False)
    # Where the bare fork still has the master's page, the sleeper's own one is a page the
    # sleeper copied: its set-up wrote it.
    extra = Counter(sleeper[a][0] for a in sleeper_own - bare_own
                    if a in bare and bare[a][1] == at_master.get(a, (None, -1))[1])
    return len(bare_own), len(sleeper_own), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", default="cpu")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--idle", type=float, default=1.0)
    args = parser.parse_args()
    try:
        open("/proc/kpagecount", "rb").close()
    except OSError as exc:
        sys.exit(f"child_pages: /proc/kpagecount: {exc.strerror} (run as root)")
    costs, places = [], Counter()
    for run in range(1, args.runs + 1):
        try:
            bare, sleeper, extra = one_run(args.fleet, args.idle)
        except ProbeError as exc:
            sys.exit(f"child_pages: {exc}")
        costs.append(sleeper - bare)
        places.update(extra)
        print(f"run {run}: bare fork {bare} pages of its own, sleeper {sleeper}: "
              f"+{sleeper - bare}; the sleeper's copies: "
              + ", ".join(f"{name} {n}" for name, n in extra.most_common()))
    print(f"prefork's cost per child, {args.fleet} floor, Python "
          f"{sys.version.split()[0]}: median +{statistics.median(costs)} pages "
          f"(+{statistics.median(costs) * PAGE / 2**20:.3f} MiB), runs {sorted(costs)}; "
          "the sleeper's copies per run: "
          + ", ".join(f"{name} {n / args.runs:.1f}" for name, n in places.most_common()))


if __name__ == "__main__":
    main()
