"""A guest's network: the seed's ipv4root on a network namespace of its own.

The seed bound a guest's sockets to its IPROOT addresses, which were aliases
of IPROOTDEV. Here each guest gets a network namespace (made by the launcher
with the rest of its context) and a veth pair:

    LAN ── IPROOTDEV (proxy ARP / proxy NDP) ── host ── vs-NAME ══ eth0 (guest)

- The guest's addresses sit on its eth0, with every route pointing at the
  host end: a default route out of eth0 for IPv4 (the host end answers ARP
  for everything, proxy_arp), a default via fe80::1 for IPv6.
- The host routes each guest address (/32, /128) to the host end, and
  answers for it on IPROOTDEV (proxy ARP; a proxy NDP entry per IPv6
  address), so to the LAN the addresses behave like aliases of that device.
- The host end has strict reverse-path filtering and does not accept router
  advertisements; one host-wide nftables rule drops any packet arriving from
  a guest with a source the host would not route back to that guest, for
  IPv4 and IPv6 alike (IPv6 has no rp_filter of its own).

Everything is done over netlink with pyroute2, from the calling process: the
socket for the guest side is opened inside the guest's namespace (setns of
this thread, then back), so no `ip` command and no helper process runs per
guest. Teardown is the namespace's end: the kernel removes the veth pair and
the routes through it; only the proxy NDP entries on IPROOTDEV are ours to
delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hostagent import syscalls
from hostagent.conf import GuestSettings, parse_ip_token

__all__ = [
    "GUEST_IFNAME",
    "HOST_IFNAME_PREFIX",
    "GuestAddress",
    "IPRoute",
    "NetPlan",
    "NetworkError",
    "host_ifname",
    "plan",
    "setup",
    "teardown",
]

HOST_IFNAME_PREFIX = "vs-"
GUEST_IFNAME = "eth0"
IFNAMSIZ = 15  # include/uapi/linux/if.h: IFNAMSIZ 16, with the NUL
GATEWAY6 = ipaddress.IPv6Address("fe80::1")

# include/uapi/linux/if_addr.h
IFA_F_NODAD = 0x02  # usable at once: no duplicate address detection wait
IFA_F_NOPREFIXROUTE = 0x200  # no on-link route for the prefix: all goes via the host
# include/uapi/linux/neighbour.h
NTF_PROXY = 0x08
# include/uapi/linux/rtnetlink.h
RT_SCOPE_LINK = 253

_NFT_RULES = """\
add table inet vpanel
add chain inet vpanel guest_source {{ type filter hook prerouting priority raw; policy accept; }}
flush chain inet vpanel guest_source
add rule inet vpanel guest_source iifname "{prefix}*" fib saddr . iif oif missing drop
"""

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
Iface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class NetworkError(RuntimeError):
    """The guest's network cannot be set up; the message says what to fix."""


@dataclass(frozen=True)
class GuestAddress:
    interface: Iface  # the address with the prefix the guest sees
    uplink: str  # the host device it is announced on (IPROOTDEV or DEV:)
    broadcast: ipaddress.IPv4Address | None = None

    @property
    def ip(self) -> Addr:
        return self.interface.ip


@dataclass(frozen=True)
class NetPlan:
    name: str
    host_if: str
    addresses: tuple[GuestAddress, ...]

    def proxy6(self) -> tuple[tuple[str, str], ...]:
        return tuple((a.uplink, str(a.ip)) for a in self.addresses if a.ip.version == 6)


def host_ifname(name: str) -> str:
    """The host end's name: vs-NAME, or a shortened name with a hash when that is too long.

    Two guests whose names share their first six characters still get
    different names (the hash covers the whole name).
    """
    full = HOST_IFNAME_PREFIX + name
    if len(full) <= IFNAMSIZ:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:5]
    return f"{HOST_IFNAME_PREFIX}{name[:IFNAMSIZ - len(HOST_IFNAME_PREFIX) - 6]}-{digest}"


# --- planning: what the guest gets, validated against the host ------------------

def _ifindex(ifname: str) -> int | None:
    """The index of IFNAME in the calling thread's network namespace, or None.

    An ioctl (SIOCGIFINDEX): microseconds, where a netlink RTM_GETLINK costs
    milliseconds of parsing in pyroute2 and link_lookup() dumps every link.
    """
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def _device_addrs(ipr: IPRoute, ifname: str) -> list[tuple[Iface, str | None]]:
    idx = _ifindex(ifname)
    if idx is None:
        return []
    out: list[tuple[Iface, str | None]] = []
    for msg in ipr.get_addr(index=idx):
        addr = msg.get_attr("IFA_ADDRESS")
        out.append((ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"),
                    msg.get_attr("IFA_BROADCAST")))
    return out


def plan(name: str, s: GuestSettings, ipr: IPRoute) -> NetPlan:
    """Resolve the guest's IPROOT into addresses, prefixes and uplinks on this host.

    A prefix comes from the address itself (IP/PREFIX, IP/MASK), else from
    IPROOTMASK, else from the uplink's own address of that family (the seed:
    "IPROOTMASK defaults from the device"), else /32 or /128. The broadcast
    comes from IPROOTBCAST, else from the uplink, else from the prefix.
    """
    addrs: list[GuestAddress] = []
    for token in s.iproot:
        t = parse_ip_token(token)
        uplink = t.dev or s.iprootdev
        if not uplink:
            raise NetworkError(
                f"IPROOT address {t.address} has no device: set IPROOTDEV or write DEV:{t.address}")
        if _ifindex(uplink) is None:
            raise NetworkError(f"IPROOT device {uplink!r} does not exist on this host")
        dev_addrs = _device_addrs(ipr, uplink)
        same_family = [(i, b) for i, b in dev_addrs
                       if i.version == t.address.version and not i.ip.is_link_local]
        prefix = t.prefixlen
        if prefix is None and s.iprootmask and t.address.version == 4:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{s.iprootmask}").prefixlen
        if prefix is None:
            inside = [i for i, _ in same_family if t.address in i.network]
            candidates = inside or [i for i, _ in same_family]
            prefix = candidates[0].network.prefixlen if candidates else t.address.max_prefixlen
        iface = ipaddress.ip_interface(f"{t.address}/{prefix}")
        bcast: ipaddress.IPv4Address | None = None
        if isinstance(iface, ipaddress.IPv4Interface):
            if s.iprootbcast:
                bcast = ipaddress.IPv4Address(s.iprootbcast)
            elif prefix < 31:
                dev_b = [b for i, b in same_family if b and t.address in i.network]
                bcast = ipaddress.IPv4Address(dev_b[0]) if dev_b \
                    else iface.network.broadcast_address
        addrs.append(GuestAddress(iface, uplink, bcast))
    return NetPlan(name, host_ifname(name), tuple(addrs))


def host_addresses(ipr: IPRoute) -> dict[Addr, str]:
    """Every address on this host's devices (link-local ones aside), with its device."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    held: dict[Addr, str] = {}
    for msg in ipr.get_addr():
        ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
        if not ip.is_link_local:
            held[ip] = names.get(msg["index"], f"#{msg['index']}")
    return held


def check_free(wanted: Iterable[Addr], others: dict[Addr, str], ipr: IPRoute) -> None:
    """Refuse an address another guest (OTHERS: address -> guest) or the host already holds."""
    host = host_addresses(ipr)
    for ip in wanted:
        if ip in others:
            raise NetworkError(f"address {ip} is already used by vserver {others[ip]}")
        if ip in host:
            raise NetworkError(f"address {ip} is already used by the host, on {host[ip]}")


# --- setup and teardown ---------------------------------------------------------

def _sysctl(path: str, value: str) -> None:
    """Write one /proc/sys value, in the network namespace of the calling thread."""
    p = Path("/proc/sys") / path
    try:
        if p.read_text().strip() == value:
            return
        p.write_text(value)
    except OSError as e:
        raise NetworkError(f"cannot set {path.replace('/', '.')} = {value}: {e}") from e


@contextlib.contextmanager
def in_netns_of(pidfd: int) -> Iterator[None]:
    """Run the block in the network namespace of the process PIDFD names (this thread only)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(pidfd, syscalls.CLONE_NEWNET)
        try:
            yield
        finally:
            syscalls.setns(home, syscalls.CLONE_NEWNET)
    finally:
        os.close(home)


_nft_done: set[int] = set()
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h (Linux 5.14)


def _netns_cookie() -> int:
    """An id of the calling thread's network namespace that is never reused (unlike its inode)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sk:
        return int.from_bytes(sk.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _ensure_source_filter() -> None:
    """Load the host-wide anti-spoofing rule once per network namespace and process."""
    ns = _netns_cookie()
    if ns in _nft_done:
        return
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.access(nft, os.X_OK):
        raise NetworkError(
            "nft not found: apt-get install nftables (it drops forged guest sources)")
    res = subprocess.run([nft, "-f", "-"], input=_NFT_RULES.format(prefix=HOST_IFNAME_PREFIX),
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise NetworkError(f"loading the guest source filter failed: {res.stderr.strip()}")
    _nft_done.add(ns)


def setup(p: NetPlan, pidfd: int, pid: int, ipr: IPRoute | None = None) -> None:
    """Give the guest whose PID 1 is PID (PIDFD) its network. Undo with teardown().

    IPR is a netlink socket in the host's namespace to reuse (making one costs
    a few milliseconds of pyroute2 set-up). On failure everything made so far
    is removed before the error is raised.
    """
    with contextlib.ExitStack() as stack:
        if ipr is None:
            ipr = stack.enter_context(IPRoute())
        try:
            _setup_host(p, pid, ipr)
            _setup_guest(p, pidfd)
        except BaseException:
            _remove_host_side(p, ipr)
            raise


def _setup_host(p: NetPlan, pid: int, ipr: IPRoute) -> None:
    if p.addresses:
        _ensure_source_filter()
    if any(a.ip.version == 4 for a in p.addresses):
        _sysctl("net/ipv4/ip_forward", "1")
    if any(a.ip.version == 6 for a in p.addresses):
        _sysctl("net/ipv6/conf/all/forwarding", "1")
    for a in p.addresses:
        # Proxy answers wait up to neigh.proxy_delay (0.8 s) by default: the
        # LAN's first packet to a new guest would too.
        if a.ip.version == 4:
            _sysctl(f"net/ipv4/conf/{a.uplink}/proxy_arp", "1")
            _sysctl(f"net/ipv4/neigh/{a.uplink}/proxy_delay", "0")
        else:
            _sysctl(f"net/ipv6/conf/{a.uplink}/proxy_ndp", "1")
            _sysctl(f"net/ipv6/neigh/{a.uplink}/proxy_delay", "0")
    if _ifindex(p.host_if) is not None and not _wait_gone(ipr, p.host_if):
        raise NetworkError(f"a device named {p.host_if} already exists on the host")
    try:
        ipr.link("add", ifname=p.host_if, kind="veth",
                 peer={"ifname": GUEST_IFNAME, "net_ns_pid": pid})
    except NetlinkError as e:
        raise NetworkError(f"creating {p.host_if}: {e}") from e
    idx = _ifindex(p.host_if)
    if idx is None:
        raise NetworkError(f"{p.host_if} vanished right after it was made")
    _sysctl(f"net/ipv4/conf/{p.host_if}/rp_filter", "1")
    _sysctl(f"net/ipv4/conf/{p.host_if}/proxy_arp", "1")
    _sysctl(f"net/ipv4/neigh/{p.host_if}/proxy_delay", "0")
    _sysctl(f"net/ipv6/conf/{p.host_if}/accept_ra", "0")
    ipr.link("set", index=idx, state="up")
    if any(a.ip.version == 6 for a in p.addresses):
        ipr.addr("add", index=idx, address=str(GATEWAY6), prefixlen=64, flags=IFA_F_NODAD)
    for a in p.addresses:
        ipr.route("add", dst=f"{a.ip}/{a.ip.max_prefixlen}", oif=idx, scope=RT_SCOPE_LINK)
        if a.ip.version == 6:
            ipr.neigh("add", dst=str(a.ip), ifindex=_ifindex(a.uplink), flags=NTF_PROXY)


def _wait_gone(ipr: IPRoute, ifname: str, timeout: float = 2.0) -> bool:
    """Wait for IFNAME to vanish: the host end of this guest's previous run, whose
    namespace the kernel is still taking down (a restart comes right after a stop)."""
    deadline = time.monotonic() + timeout
    while _ifindex(ifname) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _setup_guest(p: NetPlan, pidfd: int) -> None:
    with in_netns_of(pidfd):
        # The socket belongs to the namespace it was made in, whatever the
        # thread does afterwards; sysctls are read per opener, so they too
        # are written while we are inside.
        gipr = IPRoute()
        _sysctl(f"net/ipv6/conf/{GUEST_IFNAME}/accept_ra", "0")
        _sysctl(f"net/ipv6/conf/{GUEST_IFNAME}/accept_dad", "0")
        idx = _ifindex(GUEST_IFNAME)
    try:
        if idx is None:
            raise NetworkError(f"the guest has no {GUEST_IFNAME}")
        for a in p.addresses:
            kw: dict[str, Any] = {"index": idx, "address": str(a.ip),
                                  "prefixlen": a.interface.network.prefixlen}
            if a.ip.version == 4:
                if a.broadcast is not None:
                    kw["broadcast"] = str(a.broadcast)
            else:
                kw["flags"] = IFA_F_NODAD | IFA_F_NOPREFIXROUTE
            gipr.addr("add", **kw)
        gipr.link("set", index=idx, state="up")
        if any(a.ip.version == 4 for a in p.addresses):
            gipr.route("add", dst="0.0.0.0/0", oif=idx, scope=RT_SCOPE_LINK)
        if any(a.ip.version == 6 for a in p.addresses):
            gipr.route("add", dst="::/0", gateway=str(GATEWAY6), oif=idx, family=10)
    except NetlinkError as e:
        raise NetworkError(f"configuring the guest's {GUEST_IFNAME}: {e}") from e
    finally:
        gipr.close()


def _remove_host_side(p: NetPlan, ipr: IPRoute) -> None:
    _remove_proxy6(ipr, p.proxy6())
    idx = _ifindex(p.host_if)
    if idx is not None:
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=idx)


def _remove_proxy6(ipr: IPRoute, entries: Iterable[tuple[str, str]]) -> None:
    for dev, addr in entries:
        idx = _ifindex(dev)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", dst=addr, ifindex=idx, flags=NTF_PROXY)


def teardown(proxy6: Iterable[tuple[str, str]]) -> None:
    """What the guest's namespace does not take with it: the proxy NDP entries.

    The veth pair and the routes through it go when the namespace ends (the
    kernel reaps them asynchronously; deleting them one by one would wait for
    RCU grace periods, tens of milliseconds per guest).
    """
    entries = list(proxy6)
    if not entries:
        return
    with IPRoute() as ipr:
        _remove_proxy6(ipr, entries)


def forget(p: NetPlan) -> None:
    """Remove what a start killed half-way may have left of P on the host.

    The veth's guest end is made inside the guest's namespace, so the pair goes
    with it; a start that died after adding the proxy NDP entries but before
    recording them leaves those, which only the plan can name.
    """
    with IPRoute() as ipr:
        _remove_host_side(p, ipr)
