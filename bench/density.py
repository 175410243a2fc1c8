"""Density: N idle busybox guests against N bare unshare(1) sleepers, in one run.

    sudo .venv/bin/python bench/density.py [--guests 100]

The seed promises "no overhead, no monitoring process". Per idle guest this
prints the start time, the Pss of every process it holds (its init, plus
any supervisor: vpanel has none, unshare(1) stays as one), the memory its
cgroups are charged (user and kernel memory, where the host has a memory
controller) and the change in the host's used memory. The peer is

    unshare --pid --fork --mount --uts --ipc --net --mount-proc --kill-child \\
        chroot ROOT /bin/sleep 3600

on the same busybox tree. Both run in a network namespace of this process's
own; everything is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from roots import bench_roots  # bench/roots.py, beside this script

from hostagent import guest, limits, syscalls
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths


def pss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def used_kb() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = {k: int(v.split()[0]) for k, v in info.items() if v.strip().endswith("kB")}
    return kb["MemTotal"] - kb["MemAvailable"]


def memcg_bytes(relpath: str) -> int | None:
    h = limits.controller_hierarchies().get("memory")
    if h is None:
        return None
    f = h.mount / relpath / ("memory.current" if h.version == 2 else "memory.usage_in_bytes")
    try:
        return int(f.read_text())
    except OSError:
        return None


def children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += children(k)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=100)
    args = ap.parse_args()
    if args.guests < 1:
        ap.error("--guests must be at least 1")
    n = args.guests
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        print("bench/density.py: needs root and unshare(1)", file=sys.stderr)
        return 2
    syscalls.unshare(syscalls.CLONE_NEWNET)  # nothing here touches the real network
    with bench_roots("density") as paths:
        return _run(paths, n, unshare)


def _run(paths: Paths, n: int, unshare: str) -> int:
    names = [f"d{i}" for i in range(n)]
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for name in names:
            guest.build(paths, name, guest.BuildOptions(method="busybox"))
            for link in (paths.root(name) / "etc/rc3.d").iterdir():
                link.unlink()  # idle: init only
        peer_root = paths.root(names[0])

        base = used_kb()
        t0 = time.perf_counter()
        states = [guest.start(paths, name) for name in names]
        ours_start = (time.perf_counter() - t0) * 1000
        time.sleep(1)
        ours_used = used_kb() - base
        ours_pids = [p for st in states for p in Cgroup(st.cgroup).procs()]
        ours_pss = pss_kb(ours_pids)
        charged = [memcg_bytes(st.cgroup) for st in states]
        for name in names:
            guest.stop(paths, name, timeout=0)

        time.sleep(1)
        base = used_kb()
        t0 = time.perf_counter()
        for _ in range(n):
            sleepers.append(subprocess.Popen(
                [unshare, "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
                 "--mount-proc", "--kill-child", "chroot", str(peer_root), "/bin/sleep", "3600"]))
        while any(not children(p.pid) for p in sleepers):
            time.sleep(0.01)
        peer_start = (time.perf_counter() - t0) * 1000
        time.sleep(1)
        peer_used = used_kb() - base
        peer_pids = [p.pid for p in sleepers] + [c for p in sleepers for c in children(p.pid)]
        peer_pss = pss_kb(peer_pids)

        print(f"guests: {n}; kernel {os.uname().release}")
        print(f"vpanel     start {ours_start / n:6.2f} ms/guest ({ours_start:.0f} ms in all); "
              f"processes {len(ours_pids) / n:.1f}/guest; Pss {ours_pss / n:6.0f} KB/guest; "
              f"host used {ours_used / n:6.0f} KB/guest")
        known = [c for c in charged if c is not None]
        if known:
            print(f"           memory cgroup charge median {statistics.median(known) / 1024:.0f} "
                  f"KB/guest (user + kernel memory)")
        print(f"unshare(1) start {peer_start / n:6.2f} ms/guest ({peer_start:.0f} ms in all); "
              f"processes {len(peer_pids) / n:.1f}/guest; Pss {peer_pss / n:6.0f} KB/guest; "
              f"host used {peer_used / n:6.0f} KB/guest")
        print(f"ratio vpanel/unshare: Pss {ours_pss / max(1, peer_pss):.2f}, "
              f"host used {ours_used / max(1, peer_used):.2f}, "
              f"start {ours_start / max(1e-9, peer_start):.2f}")
        return 0
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
