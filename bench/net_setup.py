"""A guest's network, set up and torn down: vpanel's netlink against `ip` commands.

    sudo .venv/bin/python bench/net_setup.py [--guests 50]

Everything runs in a network namespace of its own (this process unshares
one first), with an uplink veth into a "LAN" namespace: the machine's own
interfaces are never touched. Per guest, both sides do the same work:

- vpanel: netns.setup() from this process (veth with its peer created in the
  guest's namespace, addresses, routes, sysctls, proxy ARP), teardown by the
  namespace's end (the guest's PID 1 killed) with nothing deleted by hand.
- peer: the recipe of reference/perf.md with iproute2: `ip netns add`, `ip
  link add ... peer ... netns`, addresses, links up, routes, sysctls, then
  `ip netns del`.

The guests alternate (vpanel, ip, vpanel, ...), and after each vpanel setup
the first packet from the LAN is timed (busybox ping, first reply).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid

from hostagent import netns, syscalls

UPLINK = "up0"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def guest_process() -> tuple[int, int]:
    """A stand-in for a guest's PID 1: a child in a network namespace of its own."""
    pid = syscalls.fork_into(syscalls.CLONE_NEWNET)
    if pid == 0:
        signal.pause()
        os._exit(0)
    return pid, syscalls.pidfd_open(pid)


def ip_recipe(i: int, addr: str) -> tuple[float, float]:
    ns, host_if = f"vpb-ip{i}", f"vb-ip{i}"
    t0 = time.perf_counter()
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "dev", "eth0")
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "route", "add", f"{addr}/32", "dev", host_if)
    with open(f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", "w") as f:
        f.write("1")
    setup = _ms(t0)
    t0 = time.perf_counter()
    sh("ip", "netns", "del", ns)
    return setup, _ms(t0)


def first_packet_ms(lan: str, addr: str) -> float:
    res = subprocess.run(["nsenter", f"--net=/run/netns/{lan}", "busybox", "ping", "-c1", "-W2",
                          addr], capture_output=True, text=True, check=False)
    m = re.search(r"time=([0-9.]+) ms", res.stdout)
    return float(m.group(1)) if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=50)
    args = ap.parse_args()
    if args.guests < 1:
        ap.error("--guests must be at least 1")
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("busybox"):
        print("bench/net_setup.py: needs root, ip(8) and busybox", file=sys.stderr)
        return 2
    # Our own "host": nothing below touches the machine's real network.
    syscalls.unshare(syscalls.CLONE_NEWNET)
    lan = f"vpb-lan-{uuid.uuid4().hex[:6]}"
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "netns", "add", lan)
    try:
        sh("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "lan0", "netns", lan)
        sh("ip", "addr", "add", "198.18.0.254/16", "dev", UPLINK)
        sh("ip", "link", "set", UPLINK, "up")
        sh("ip", "-n", lan, "addr", "add", "198.18.0.1/16", "dev", "lan0")
        sh("ip", "-n", lan, "link", "set", "lan0", "up")
        sh("ip", "-n", lan, "link", "set", "lo", "up")
        ours_setup: list[float] = []
        ours_down: list[float] = []
        peer_setup: list[float] = []
        peer_down: list[float] = []
        first: list[float] = []
        base = ipaddress.IPv4Address("198.18.1.1")
        # One netlink socket for the host side, kept as the agent keeps it.
        ipr = netns.IPRoute()
        for i in range(args.guests):
            addr = base + i
            plan = netns.NetPlan(f"b{i}", f"vs-b{i}", (
                netns.GuestAddress(ipaddress.IPv4Interface(f"{addr}/32"), UPLINK),))
            pid, pidfd = guest_process()
            try:
                t0 = time.perf_counter()
                netns.setup(plan, pidfd, pid, ipr)
                ours_setup.append(_ms(t0))
                first.append(first_packet_ms(lan, str(addr)))
            finally:
                t0 = time.perf_counter()
                syscalls.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.waitpid(pid, 0)
                netns.teardown(plan.proxy6())
                ours_down.append(_ms(t0))
                os.close(pidfd)
            s, d = ip_recipe(i, str(base + 1000 + i))
            peer_setup.append(s)
            peer_down.append(d)
        ipr.close()
        med = statistics.median
        print(f"guests: {args.guests} each way, alternating; kernel {os.uname().release}")
        print(f"vpanel netlink  setup median {med(ours_setup):6.2f} ms   "
              f"teardown {med(ours_down):6.2f} ms")
        print(f"ip(8) commands  setup median {med(peer_setup):6.2f} ms   "
              f"teardown {med(peer_down):6.2f} ms")
        print(f"ratio vpanel/ip: setup {med(ours_setup) / med(peer_setup):.2f}, "
              f"teardown {med(ours_down) / med(peer_down):.2f}")
        print(f"first packet from the LAN answered: median {med(first):.2f} ms, "
              f"max {max(first):.2f} ms")
        return 0
    finally:
        subprocess.run(["ip", "netns", "del", lan], capture_output=True, check=False)


if __name__ == "__main__":
    sys.exit(main())
