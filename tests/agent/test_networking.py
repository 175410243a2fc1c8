"""ipv4root on today's kernel: guests on a test LAN, reached at their own addresses.

Each test builds its own little world and never touches the machine's own
interfaces: a "host" network namespace (where the guests' host ends, routes
and proxy entries live, as they would in the real host's) with an uplink veth
into a "LAN" namespace, addresses from 198.18.0.0/15 and fd00::/8. Guest
operations run with this thread inside the host namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostagent import guest, netns, syscalls
from hostagent.conf import GuestConf, settings
from tests.agent.conftest import UPLINK, Lan, ip


def in_guest_netns(st: guest.RunState, fn: Callable[[], int]) -> int:
    """Run FN in a child that has joined the guest's network namespace (as the guest could)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = syscalls.pidfd_open(st.init_pid)
            syscalls.setns(fd, syscalls.CLONE_NEWNET)
            code = fn()
        except BaseException as e:
            os.write(2, f"in guest netns: {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def udp_listener(lan: Lan, family: int, port: int) -> subprocess.Popen[str]:
    """A UDP receiver in the LAN namespace that prints each sender's address."""
    bind = "::" if family == socket.AF_INET6 else "0.0.0.0"
    code = (
        "import socket,sys\n"
        f"s=socket.socket({int(family)},socket.SOCK_DGRAM)\n"
        f"s.bind(('{bind}',{port}))\n"
        "s.settimeout(3)\nprint('ready',flush=True)\n"
        "try:\n"
        "  while True:\n"
        "    d,a=s.recvfrom(100);print(a[0],flush=True)\n"
        "except TimeoutError:\n  pass\n"
    )
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{lan.lan}", "python3", "-c", code],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: str, dst: str, port: int) -> tuple[int, bytes]:
    """(ethertype, an IPv4 or IPv6 packet carrying one UDP datagram from SRC) built by hand."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    payload = b"forged?"
    udp_len = 8 + len(payload)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0,
                          s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
        udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload  # no checksum: allowed
        return 0x0800, hdr + udp
    pseudo = s.packed + d.packed + struct.pack("!IxxxB", udp_len, 17)
    udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    hdr = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, s.packed, d.packed)
    return 0x86DD, hdr + udp


def send_packet_from(src: str, dst: str, port: int, next_hop_mac: str) -> Callable[[], int]:
    """What a guest with CAP_NET_RAW can do: put any packet on its eth0."""
    ethertype, packet = udp_packet(src, dst, port)

    def send() -> int:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ethertype))
        mac = bytes.fromhex(next_hop_mac.replace(":", ""))
        for _ in range(3):
            s.sendto(packet, (netns.GUEST_IFNAME, ethertype, 0, 0, mac))
        return 0

    return send


def host_end_mac(lan: Lan, ifname: str) -> str:
    with lan.on_host(), netns.IPRoute() as ipr:
        return str(ipr.get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS"))


# --- tests --------------------------------------------------------------------------

def test_lan_reaches_each_guests_own_httpd_over_ipv4_and_ipv6(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10), lan.v6(10), page="page of A\n")
    lan.guest("gb", lan.v4(11), lan.v6(11), page="page of B\n")
    # The same vanilla service (busybox httpd on 0.0.0.0:80) in both, no conflict.
    assert lan.http_get(lan.v4(10)) == "page of A\n"
    assert lan.http_get(lan.v4(11)) == "page of B\n"
    assert lan.http_get(lan.v6(10)) == "page of A\n"
    assert lan.http_get(lan.v6(11)) == "page of B\n"
    # Nothing of theirs listens on the host's own address.
    assert lan.http_get(lan.v4(254)).startswith("FAILED")


def test_guest_sees_only_lo_and_its_own_device(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10))
    code, out = lan.run("ga", "ip -o link | cut -d: -f2; ls /sys/class/net")
    assert code == 0
    names = out.split()
    assert sorted(set(n.split("@")[0] for n in names)) == ["eth0", "lo"], out


def test_guest_root_cannot_change_addresses_routes_or_links(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10))
    _, before = lan.run("ga", "ip addr; ip route")
    code, out = lan.run("ga", f"""
        ip addr add {lan.v4(99)}/24 dev eth0 && echo ADDR_ADDED
        ip route add 198.19.113.0/24 dev eth0 && echo ROUTE_ADDED
        ip link set eth0 down && echo LINK_DOWN
        ip link add dummy0 type veth && echo LINK_ADDED
        true""")
    assert code == 0
    assert not any(w in out for w in ("ADDR_ADDED", "ROUTE_ADDED", "LINK_DOWN", "LINK_ADDED"))
    _, after = lan.run("ga", "ip addr; ip route")
    assert after == before
    assert lan.http_get(lan.v4(10)) != ""


def test_guest_cannot_bind_an_address_not_its_own(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10))
    lan.guest("gb", lan.v4(11))
    code, out = lan.run("ga", f"""
        httpd -f -p {lan.v4(11)}:81 2>&1 & sleep 0.3
        httpd -f -p {lan.v4(254)}:82 2>&1 & sleep 0.3
        httpd -p {lan.v4(10)}:83 && echo OWN_OK
        netstat -ltn""")
    assert code == 0
    assert out.count("Cannot assign requested address") == 2, out
    assert "OWN_OK" in out and f"{lan.v4(10)}:83" in out


def test_ping_needs_cap_net_raw(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10), lan.v6(10))
    code, out = lan.run("ga", f"ping -c1 -W2 {lan.v4(1)}")
    assert code != 0, out
    with lan.on_host():
        guest.stop(lan.paths, "ga", timeout=0)
        conf = GuestConf.load(lan.paths.conf("ga"))
        conf.set("S_CAPS", "CAP_NET_RAW")
        conf.save(lan.paths.conf("ga"))
        guest.start(lan.paths, "ga", output=lambda _b: None)
    code, out = lan.run("ga", f"ping -c1 -W2 {lan.v4(1)}; ping -c1 -W2 {lan.v6(1)}")
    assert code == 0, out
    assert out.count("1 packets received") == 2


@pytest.mark.parametrize("v6", [False, True])
def test_forged_source_never_reaches_the_lan(lan: Lan, v6: bool) -> None:
    addr = lan.v6 if v6 else lan.v4
    st = lan.guest("ga", addr(10))
    lan.guest("gb", addr(11))
    port = 9000 + int(v6)
    family = socket.AF_INET6 if v6 else socket.AF_INET
    mac = host_end_mac(lan, st.host_if)
    listener = udp_listener(lan, family, port)
    try:
        # The guest's own address gets through (the positive twin)...
        assert in_guest_netns(st, send_packet_from(addr(10), addr(1), port, mac)) == 0
        # ...a neighbour's, an unused one and the host's never leave the host.
        for forged in (addr(11), addr(99), addr(254)):
            assert in_guest_netns(st, send_packet_from(forged, addr(1), port, mac)) == 0
        out, _ = listener.communicate(timeout=10)
    finally:
        listener.kill()
    senders = {ipaddress.ip_address(line) for line in out.split()}
    assert senders == {ipaddress.ip_address(addr(10))}


def test_guest_cannot_see_another_guests_traffic(lan: Lan) -> None:
    st = lan.guest("ga", lan.v4(10), caps=("CAP_NET_RAW",))
    lan.guest("gb", lan.v4(11), page="secret of B\n")

    def sniff() -> int:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        s.settimeout(0.2)
        seen = b""
        for _ in range(15):
            with contextlib.suppress(TimeoutError):
                seen += s.recv(65535)
        return 1 if b"secret of B" in seen or socket.inet_aton(lan.v4(11)) in seen else 0

    pid = os.fork()
    if pid == 0:
        os._exit(in_guest_netns(st, sniff))
    for _ in range(3):
        assert lan.http_get(lan.v4(11)) == "secret of B\n"
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_address_held_by_another_guest_or_the_host_is_refused(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10), lan.v6(10))
    with lan.on_host():
        with pytest.raises(guest.GuestError, match="used by vserver ga"):
            guest.build(lan.paths, "gb", guest.BuildOptions(method="busybox",
                                                             ips=[lan.v6(10)]))
        with pytest.raises(guest.GuestError, match=f"used by the host, on {UPLINK}"):
            guest.build(lan.paths, "gb", guest.BuildOptions(method="busybox",
                                                             ips=[lan.v4(254)]))
        # A conf edited by hand is checked again at start.
        guest.build(lan.paths, "gc", guest.BuildOptions(method="busybox"))
        conf = GuestConf.load(lan.paths.conf("gc"))
        conf.set("IPROOT", lan.v4(10))
        conf.set("IPROOTDEV", UPLINK)
        conf.save(lan.paths.conf("gc"))
        with pytest.raises(guest.GuestError, match="used by vserver ga"):
            guest.start(lan.paths, "gc")
        assert not guest.running(lan.paths, "gc")


def host_state(lan: Lan) -> str:
    return "".join(ip("-n", lan.host, *args) for args in (
        ["link"], ["route"], ["-6", "route"], ["-6", "neigh", "show", "proxy"],
        ["netns", "list-id"]))


def test_stop_leaves_no_veth_route_proxy_entry_or_namespace(lan: Lan) -> None:
    before = host_state(lan)
    st = lan.guest("ga", lan.v4(10), lan.v6(10))
    during = host_state(lan)
    assert st.host_if == "vs-ga" and "vs-ga" in during and lan.v6(10) in during
    guest_ns = os.readlink(f"/proc/{st.init_pid}/ns/net")
    with lan.on_host():
        guest.stop(lan.paths, "ga")
    assert wait_for(lambda: "vs-ga" not in host_state(lan))
    after = host_state(lan)
    assert "vs-ga" not in after and lan.v4(10) not in after and lan.v6(10) not in after
    assert after.count("\n") <= before.count("\n") + 1  # a forwarding route cache line at most
    alive = [p for p in os.listdir("/proc") if p.isdigit()
             and os.path.exists(f"/proc/{p}/ns/net")
             and _readlink(f"/proc/{p}/ns/net") == guest_ns]
    assert alive == []


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_restart_right_after_stop_gets_its_network_back(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10), lan.v6(10), page="again\n")
    with lan.on_host():
        for _ in range(3):
            guest.stop(lan.paths, "ga", output=lambda _b: None)
            guest.start(lan.paths, "ga", output=lambda _b: None)
    assert lan.http_get(lan.v4(10)) == "again\n"
    assert lan.http_get(lan.v6(10)) == "again\n"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_failed_network_setup_leaves_nothing(lan: Lan) -> None:
    with lan.on_host():
        guest.build(lan.paths, "ga", guest.BuildOptions(method="busybox", ips=[lan.v4(10)]))
        # No IPROOTDEV: refused before anything is made.
        with pytest.raises(guest.GuestError, match="IPROOTDEV"):
            guest.start(lan.paths, "ga")
        conf = GuestConf.load(lan.paths.conf("ga"))
        conf.set("IPROOTDEV", UPLINK)
        conf.save(lan.paths.conf("ga"))
        # A failure inside the new PID 1 while the network is being built.
        for step in ("network", "mounts", "runlevel"):
            with pytest.raises(guest.GuestError, match=step):
                guest.start(lan.paths, "ga", fail_at=step)
            assert not guest.running(lan.paths, "ga")
            # The kernel reaps the veth with the namespace, a moment later.
            assert wait_for(lambda: "vs-ga" not in ip("-n", lan.host, "link"))
        guest.start(lan.paths, "ga", output=lambda _b: None)
    assert lan.http_get(lan.v4(10)) != ""


def test_iproot_forms_of_the_seed(lan: Lan) -> None:
    text = (
        f'IPROOT="{lan.v4(10)} {UPLINK}:{lan.v4(11)}/255.255.0.0 {lan.v4(12)}/28 {lan.v6(10)}"\n'
        f'IPROOTDEV="{UPLINK}"\nIPROOTBCAST=""\n'
    )
    with lan.on_host(), netns.IPRoute() as ipr:
        p = netns.plan("forms", settings(GuestConf.parse(text)), ipr)
        got = {str(a.interface): (a.uplink, str(a.broadcast)) for a in p.addresses}
        assert got == {
            # No prefix given: the uplink's own (/24), its broadcast too.
            f"{lan.v4(10)}/24": (UPLINK, lan.v4(255)),
            f"{lan.v4(11)}/16": (UPLINK, "198.18.255.255"),
            f"{lan.v4(12)}/28": (UPLINK, lan.v4(15)),
            f"{lan.v6(10)}/64": (UPLINK, "None"),
        }
        masked = netns.plan("m", settings(GuestConf.parse(
            f'IPROOT="{lan.v4(20)}"\nIPROOTDEV="{UPLINK}"\nIPROOTMASK="255.255.255.128"\n'
            f'IPROOTBCAST="{lan.v4(127)}"\n')), ipr)
        assert [(str(a.interface), str(a.broadcast)) for a in masked.addresses] == [
            (f"{lan.v4(20)}/25", lan.v4(127))]
        with pytest.raises(netns.NetworkError, match="does not exist"):
            netns.plan("x", settings(GuestConf.parse(f'IPROOT="nosuch0:{lan.v4(30)}"\n')), ipr)


def test_sixteen_addresses_work(lan: Lan) -> None:
    ips = [lan.v4(100 + i) for i in range(8)] + [lan.v6(100 + i) for i in range(8)]
    lan.guest("many", *ips, page="many\n")
    for addr in (ips[0], ips[7], ips[8], ips[15]):
        assert lan.http_get(addr) == "many\n"


def test_unrestricted_guest_shares_the_host_network_and_says_so(lan: Lan) -> None:
    lan.guest("open", extra={"IPROOT": "ALL"})
    code, out = lan.run("open", "ls /sys/class/net")
    assert code == 0 and UPLINK in out.split()
    with lan.on_host():
        st = guest.status(lan.paths, "open")
    assert st.shared_network and "unrestricted" in st.text()


def test_host_ifname_is_short_and_unique() -> None:
    names = ["a", "web1", "abcdefghijkl", "abcdefghijklm", "abcdefghijklmnopqrstuvwxyz01234",
             "abcdefghijklmnopqrstuvwxyz01235"]
    ifnames = [netns.host_ifname(n) for n in names]
    assert all(len(n) <= 15 for n in ifnames)
    assert len(set(ifnames)) == len(ifnames)
    assert ifnames[:3] == ["vs-a", "vs-web1", "vs-abcdefghijkl"]
    assert all(n.startswith(netns.HOST_IFNAME_PREFIX) for n in ifnames)


def test_first_packet_from_the_lan_is_answered_at_once(lan: Lan) -> None:
    lan.guest("ga", lan.v4(10))
    # Proxy ARP answers wait neigh.proxy_delay (0.8 s) unless it is 0.
    delay = Path(f"/proc/sys/net/ipv4/neigh/{UPLINK}/proxy_delay")
    with lan.on_host():
        assert delay.read_text().strip() == "0"
    res = lan.from_lan("busybox", "ping", "-c1", "-W1", lan.v4(10))
    assert res.returncode == 0, res.stdout + res.stderr
