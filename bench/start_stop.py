"""Start -> exec `true` -> stop of a busybox guest, against unshare(1) + chroot.

    sudo .venv/bin/python bench/start_stop.py [--runs 50]

Both sides run in this one process and alternate, so load on the machine
hits them alike. The guest side goes through the same library the `vserver`
command and (later) the agent use, from a resident process: no interpreter
is started per guest. The peer is util-linux:

    unshare --pid --fork --mount --uts --ipc chroot ROOT /bin/true

which creates the same namespaces and switches root, but sets up no /proc,
/dev, cgroup, capability ceiling or seccomp filter and leaves nothing running
to enter. The guest is busybox with an empty runlevel 3, so what is measured
is the mechanism, not busybox's services.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from roots import bench_roots  # bench/roots.py, beside this script

from hostagent import guest


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--idmap", choices=("none", "isolated"), default="none",
                    help="IDMAP of the guest: isolated starts it in a user namespace of its own")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("bench/start_stop.py: run as root", file=sys.stderr)
        return 2
    unshare = shutil.which("unshare")
    if unshare is None:
        print("bench/start_stop.py: unshare(1) not found (util-linux)", file=sys.stderr)
        return 2

    name = "bench"
    with bench_roots("bench") as paths:
        guest.build(paths, name, guest.BuildOptions(method="busybox", idmap=args.idmap))
        root = paths.root(name)
        for link in (root / "etc/rc3.d").iterdir():
            link.unlink()
        sink = bytearray()
        peer_cmd = [unshare, "--pid", "--fork", "--mount", "--uts", "--ipc",
                    "chroot", str(root), "/bin/true"]

        ours: list[float] = []
        phases: dict[str, list[float]] = {"start": [], "exec": [], "stop": []}
        peer: list[float] = []
        ratios: list[float] = []
        # Warm both paths (page cache, the sealed init copy, libseccomp).
        guest.start(paths, name)
        guest.exec_in(paths, name, ["/bin/true"], output=sink.extend)
        guest.stop(paths, name)
        subprocess.run(peer_cmd, check=True)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            guest.start(paths, name)
            t1 = time.perf_counter()
            code = guest.exec_in(paths, name, ["/bin/true"], output=sink.extend)
            t2 = time.perf_counter()
            guest.stop(paths, name)
            t3 = time.perf_counter()
            if code != 0:
                raise SystemExit(f"exec true failed with {code}")
            ours.append((t3 - t0) * 1000)
            phases["start"].append((t1 - t0) * 1000)
            phases["exec"].append((t2 - t1) * 1000)
            phases["stop"].append((t3 - t2) * 1000)

            t0 = time.perf_counter()
            subprocess.run(peer_cmd, check=True)
            peer.append(_ms(t0))
            ratios.append(ours[-1] / peer[-1])

        med_ours, med_peer = statistics.median(ours), statistics.median(peer)
        print(f"runs: {args.runs} (alternating), kernel {os.uname().release}")
        print(f"vpanel start+exec true+stop   median {med_ours:7.2f} ms  "
              f"(start {statistics.median(phases['start']):.2f}, "
              f"exec {statistics.median(phases['exec']):.2f}, "
              f"stop {statistics.median(phases['stop']):.2f})")
        print(f"unshare(1) + chroot /bin/true median {med_peer:7.2f} ms")
        print(f"ratio vpanel/unshare: {med_ours / med_peer:.2f} "
              f"(median of paired ratios {statistics.median(ratios):.2f})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
