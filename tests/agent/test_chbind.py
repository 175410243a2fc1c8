"""chbind: the seed's ipv4root, checked from both ends of a wire.

Each test builds its own little network and never touches the machine's own
interfaces: a network namespace where chbind runs ("ns", with lo up and, on
its veth, 198.18.N.1/24 plus a second address 198.18.N.3, fd00:N::1 and
fd00:N::3) and a "peer" namespace at the other end of the veth (198.18.N.2,
fd00:N::2), where the servers that report what they see run. Commands enter
the namespaces with nsenter, which leaves the mounts (and so the cgroup v2
tree chbind needs) alone; `ip netns exec` would hide them behind a new /sys.

The seed ("Playing with /usr/sbin/chbind"): a service restarted under
`chbind --ip eth0` listens on that address instead of 0.0.0.0, and a client
under chbind connects from it, even to localhost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from hostagent import bpf
from hostagent.cgroup import Cgroup, tracking_hierarchy
from tests.helpers import run

BIN = Path(sys.executable).parent
CHBIND = str(BIN / "chbind")
PY = sys.executable
NOBODY = 65534
ANNOUNCE = re.compile(r"^ipv4root is now (.+)$", re.MULTILINE)


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"


@dataclass
class Net:
    ns: str  # where chbind runs
    peer: str  # the other end of the veth
    dev: str  # the veth in ns
    subnet: int  # 198.18.N.0/24, fd00:N::/64

    def addr(self, family: int, last: int) -> str:
        return f"198.18.{self.subnet}.{last}" if family == 4 else f"fd00:{self.subnet}::{last}"

    def any(self, family: int) -> str:
        return "0.0.0.0" if family == 4 else "::"

    def in_ns(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]

    def in_peer(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.peer}", *argv]

    def chbind(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return run(self.in_ns(CHBIND, *args), **kw)


@pytest.fixture
def cgroup_base(monkeypatch: pytest.MonkeyPatch, root_required: None) -> Iterator[Path]:
    """A cgroup parent of this test's own (VSERVER_CGROUP); it must be gone afterwards."""
    name = f"vpanel-test-chbind-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("VSERVER_CGROUP", name)
    path = tracking_hierarchy().mount / name
    try:
        yield path
    finally:
        leftover = Cgroup(name)
        if leftover.exists():  # a failed test: take it down; the test reports it
            leftover.kill()
            leftover.wait_empty(5)
            leftover.remove()


@pytest.fixture
def net(cgroup_base: Path) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:8]
    n = Net(ns=f"vpcb-{tag}", peer=f"vpcbp-{tag}", dev=f"cb{tag}",
            subnet=int(tag[:2], 16) % 254 + 1)
    made: list[str] = []
    try:
        for name in (n.ns, n.peer):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", n.ns, "link", "add", n.dev, "type", "veth", "peer", "name", f"p{tag}",
           "netns", n.peer)
        for last in (1, 3):
            ip("-n", n.ns, "addr", "add", f"{n.addr(4, last)}/24", "brd", "+", "dev", n.dev)
            ip("-n", n.ns, "addr", "add", f"{n.addr(6, last)}/64", "dev", n.dev, "nodad")
        ip("-n", n.peer, "addr", "add", f"{n.addr(4, 2)}/24", "dev", f"p{tag}")
        ip("-n", n.peer, "addr", "add", f"{n.addr(6, 2)}/64", "dev", f"p{tag}", "nodad")
        ip("-n", n.ns, "link", "set", n.dev, "up")
        ip("-n", n.peer, "link", "set", f"p{tag}", "up")
        yield n
    finally:
        for name in made:  # the veth goes with its namespaces
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    assert not cgroup_base.exists(), f"chbind left {cgroup_base} behind"


@dataclass
class Background:
    """A process running for the length of a block, and the lines it printed.

    A reader thread collects stdout: select() on a buffered pipe misses lines
    that came in the same read as the previous one.
    """

    proc: subprocess.Popen[str]
    lines: queue.Queue[str]

    def next_line(self, timeout: float = 20) -> str:
        """The next line printed, failing (with stderr) if none comes."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            self.proc.kill()
            assert self.proc.stderr is not None
            err = self.proc.stderr.read()
            pytest.fail(f"{self.proc.args!r} printed nothing (rc {self.proc.wait()}); "
                        f"stderr:\n{err}")
        return line.strip()


@contextlib.contextmanager
def background(argv: list[str]) -> Iterator[Background]:
    """Run ARGV for the length of the block; terminated (then killed) and reaped after it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    bg = Background(proc, queue.Queue())

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            bg.lines.put(line)
        bg.lines.put("")  # EOF

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield bg
    finally:
        if proc.poll() is None:
            proc.terminate()  # chbind relays it to its command, then cleans up
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# --- the little programs that run on either end -----------------------------

PRELUDE = """\
import errno, socket, struct, sys
def fam(a): return socket.AF_INET6 if ":" in a else socket.AF_INET
"""

# One line per argument: bind=ADDR (port 0), connect=ADDR,PORT or fetch=ADDR,PORT
# (TCP; fetch reads the greeting). Prints the local address the socket got,
# the greeting, or the errno's name.
PROBE = PRELUDE + """
for op in sys.argv[1:]:
    kind, _, arg = op.partition("=")
    try:
        if kind == "bind":
            s = socket.socket(fam(arg))
            s.bind((arg, 0))
            print(s.getsockname()[0])
        else:
            addr, port = arg.rsplit(",", 1)
            c = socket.create_connection((addr, int(port)), timeout=5)
            print(c.recv(10).decode() if kind == "fetch" else c.getsockname()[0])
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))
"""

# Listen on ADDR, print the bound address and port, answer "hi" to everyone.
LISTEN = PRELUDE + """
s = socket.socket(fam(sys.argv[1]))
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[0], s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hi")
    c.close()
"""

# Servers that print their port, then the source address of each of N visitors.
TCP_SERVER = PRELUDE + """
s = socket.socket(fam(sys.argv[1]))
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    c, peer = s.accept()
    print(peer[0], flush=True)
    c.close()
"""

UDP_SERVER = PRELUDE + """
s = socket.socket(fam(sys.argv[1]), socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    data, peer = s.recvfrom(100)
    print(peer[0], data.decode(), flush=True)
"""

# UDP to ADDR PORT: a plain sendto, then one asking for SPOOF as source with
# IP_PKTINFO / IPV6_PKTINFO (include/uapi/linux/in.h, in6.h: 8 and 50).
SEND = PRELUDE + """
a, port, spoof = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(fam(a), socket.SOCK_DGRAM)
s.sendto(b"plain", (a, port))
s = socket.socket(fam(a), socket.SOCK_DGRAM)
if fam(a) == socket.AF_INET:
    info = (socket.IPPROTO_IP, 8, struct.pack("=i4s4s", 0, socket.inet_aton(spoof), bytes(4)))
else:
    info = (socket.IPPROTO_IPV6, 50, socket.inet_pton(socket.AF_INET6, spoof) + bytes(4))
s.sendmsg([b"pktinfo"], [info], 0, (a, port))
"""


def probe(net: Net, chbind_args: list[str], *ops: str) -> list[str]:
    """Run PROBE under chbind in the test namespace; one result per op."""
    return net.chbind("--silent", *chbind_args, PY, "-c", PROBE, *ops).stdout.split()


def parse_announce(stdout: str) -> list[str]:
    m = ANNOUNCE.search(stdout)
    assert m, f"no 'ipv4root is now' line in {stdout!r}"
    return m.group(1).split()


# --- the programs --------------------------------------------------------------

V4 = tuple(IPv4Address(f"198.18.0.{i}") for i in range(1, 17))
V6 = tuple(IPv6Address(f"fd00:1::{i:x}") for i in range(1, 17))


@pytest.mark.parametrize("policy", [
    bpf.AddressPolicy(V4[:1]),
    bpf.AddressPolicy((), V6[:1]),
    bpf.AddressPolicy(V4[:1], V6[:1], IPv4Address("198.18.0.255")),
    bpf.AddressPolicy(V4),  # 16 addresses: the longest programs
    bpf.AddressPolicy((), V6),
    bpf.AddressPolicy(V4[:8], V6[:8]),
    # An address with the top bit set in either byte order (JMP32 compares).
    bpf.AddressPolicy((IPv4Address("200.18.0.200"),), (IPv6Address("fdff:ffff::ffff:ffff"),)),
], ids=["v4", "v6", "both", "16v4", "16v6", "8+8", "high-bits"])
def test_every_shape_of_program_passes_the_verifier(
        policy: bpf.AddressPolicy, root_required: None) -> None:
    for prog in bpf.address_programs(policy):
        fd = bpf.prog_load(prog.prog_type, prog.insns, expected_attach_type=prog.attach_type,
                           name=prog.name)
        os.close(fd)


def test_a_refused_program_reports_the_verifier_log(root_required: None) -> None:
    a = bpf.Asm()
    a.ldx(bpf.BPF_W, bpf.R2, bpf.R1, 200)  # past the end of struct bpf_sock_addr
    a.ret(1)
    with pytest.raises(bpf.BPFError) as exc:
        bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, a.assemble(),
                      expected_attach_type=bpf.BPF_CGROUP_INET4_BIND, name="bad")
    assert exc.value.errno == errno.EACCES
    assert "invalid bpf_context access off=200" in str(exc.value)


def test_policy_limits() -> None:
    with pytest.raises(ValueError, match="at least one"):
        bpf.AddressPolicy()
    with pytest.raises(ValueError, match="at most 16"):
        bpf.AddressPolicy(V4, V6[:1])


# --- the announcement, exit status, cleanup ----------------------------------

def test_chbind_prints_ipv4root_and_runs_the_command(net: Net) -> None:
    res = net.chbind("--ip", net.addr(4, 1), "echo", "ran")
    assert res.stdout == f"ipv4root is now {net.addr(4, 1)}\nran\n"

    many = net.chbind("--ip", net.addr(4, 1), "--ip", net.addr(4, 3), "--ip", net.addr(6, 1),
                      "true")
    assert parse_announce(many.stdout) == [net.addr(4, 1), net.addr(4, 3), net.addr(6, 1)]

    silent = net.chbind("--silent", "--ip", net.addr(4, 1), "echo", "ran")
    assert silent.stdout == "ran\n"
    assert silent.stderr == ""


def test_chbind_exits_with_the_commands_status(net: Net) -> None:
    a = net.addr(4, 1)
    assert net.chbind("--ip", a, "sh", "-c", "exit 7", check_rc=7).returncode == 7
    assert net.chbind("--ip", a, "sh", "-c", "kill -KILL $$", check_rc=137).returncode == 137
    missing = net.chbind("--ip", a, "/nonexistent/cmd", check_rc=127)
    assert "cannot run /nonexistent/cmd" in missing.stderr


def test_chbind_leaves_no_cgroup_behind_when_the_command_is_done(net: Net,
                                                                 cgroup_base: Path) -> None:
    net.chbind("--silent", "--ip", net.addr(4, 1), "sh", "-c", "sleep 0.1 & wait")
    assert not list(cgroup_base.glob("chbind-*"))


def test_daemon_started_under_chbind_keeps_running_confined(net: Net,
                                                            cgroup_base: Path) -> None:
    # The seed's use: `chbind --ip eth0 /etc/init.d/httpd start` leaves a daemon.
    res = net.chbind("--silent", "--ip", net.addr(4, 1), "sh", "-c",
                     "sleep 300 </dev/null >/dev/null 2>&1 & echo $!; cat /proc/self/cgroup")
    lines = res.stdout.splitlines()
    left = int(lines[0])
    try:
        assert any(re.search(rf"^0::/{cgroup_base.name}/chbind-\d+$", line)
                   for line in lines), lines
        assert Path(f"/proc/{left}").exists(), "the daemon did not survive its chbind"
        cgroup = Path(f"/proc/{left}/cgroup").read_text()
        assert re.search(rf"^0::/{cgroup_base.name}/chbind-\d+$", cgroup, re.M), cgroup
    finally:
        os.kill(left, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{left}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    # The next chbind collects the now empty cgroup.
    net.chbind("--silent", "--ip", net.addr(4, 1), "true")
    assert not list(cgroup_base.glob("chbind-*"))


def test_sigterm_reaches_the_command_and_chbind_still_cleans_up(
        net: Net, cgroup_base: Path) -> None:
    with background(net.in_ns(CHBIND, "--ip", net.addr(4, 1), "sleep", "300")) as bg:
        assert parse_announce(bg.next_line()) == [net.addr(4, 1)]
        assert list(cgroup_base.glob("chbind-*")), "no cgroup while the command runs"
        bg.proc.send_signal(signal.SIGTERM)
        assert bg.proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert not cgroup_base.exists()


# --- binding ------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_listener_on_any_address_is_reachable_only_at_the_chosen_one(
        net: Net, family: int) -> None:
    chosen, other = net.addr(family, 1), net.addr(family, 3)
    with background(net.in_ns(CHBIND, "--silent", "--ip", chosen, PY, "-c", LISTEN,
                              net.any(family))) as listener:
        bound, port = listener.next_line().split()
        assert bound == chosen  # 0.0.0.0 / :: became the chosen address

        seen = run(net.in_peer(PY, "-c", PROBE, f"fetch={chosen},{port}",
                               f"fetch={other},{port}")).stdout.split()
        assert seen == ["hi", "ECONNREFUSED"]


@pytest.mark.parametrize("family", [4, 6])
def test_explicit_bind_to_another_address_fails(net: Net, family: int) -> None:
    chosen, other = net.addr(family, 1), net.addr(family, 3)
    loopback = "127.0.0.1" if family == 4 else "::1"
    binds = [f"bind={a}" for a in (other, chosen, loopback, net.any(family))]
    assert probe(net, ["--ip", chosen], *binds) == ["EADDRNOTAVAIL", chosen, loopback, chosen]

    # Without chbind the same binds all succeed: the refusal is chbind's.
    free = run(net.in_ns(PY, "-c", PROBE, *binds)).stdout.split()
    assert free == [other, chosen, loopback, net.any(family)]


def test_broadcast_address_may_be_bound(net: Net) -> None:
    subnet_bcast = f"198.18.{net.subnet}.255"
    ops = ("bind=255.255.255.255", f"bind={subnet_bcast}")
    # The seed's default --bcast is 255.255.255.255.
    assert probe(net, ["--ip", net.addr(4, 1)], *ops) == ["255.255.255.255", "EADDRNOTAVAIL"]
    given = probe(net, ["--ip", net.addr(4, 1), "--bcast", subnet_bcast], *ops)
    assert given == ["EADDRNOTAVAIL", subnet_bcast]


def test_address_not_configured_is_never_replaced_by_another(net: Net) -> None:
    """Choosing an address the host does not have leaves the command without
    network rather than falling back to the host's own addresses."""
    absent = f"198.18.{net.subnet}.77"
    with background(net.in_peer(PY, "-c", TCP_SERVER, net.addr(4, 2), "1")) as server:
        port = server.next_line()
        out = probe(net, ["--ip", absent], "bind=0.0.0.0", f"connect={net.addr(4, 2)},{port}")
        assert out == ["EADDRNOTAVAIL", "EADDRNOTAVAIL"]
        assert server.proc.poll() is None  # nobody arrived


# --- outgoing traffic ---------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_outgoing_tcp_leaves_from_the_chosen_address(net: Net, family: int) -> None:
    peer = net.addr(family, 2)
    with background(net.in_peer(PY, "-c", TCP_SERVER, peer, "3")) as server:
        port = server.next_line()
        # Both addresses of the device lead to the peer; whichever the kernel
        # picks by itself, chbind picks the chosen one.
        plain = run(net.in_ns(PY, "-c", PROBE, f"connect={peer},{port}")).stdout.strip()
        assert server.next_line() == plain
        for last in (3, 1):
            chosen = net.addr(family, last)
            assert probe(net, ["--ip", chosen], f"connect={peer},{port}") == [chosen]
            assert server.next_line() == chosen  # what the peer saw


@pytest.mark.parametrize("family", [4, 6])
def test_udp_leaves_from_the_chosen_address_even_when_asked_otherwise(
        net: Net, family: int) -> None:
    peer, chosen, other = net.addr(family, 2), net.addr(family, 3), net.addr(family, 1)
    with background(net.in_peer(PY, "-c", UDP_SERVER, peer, "2")) as server:
        port = server.next_line()
        net.chbind("--silent", "--ip", chosen, PY, "-c", SEND, peer, port, other)
        seen = sorted(server.next_line() for _ in range(2))
        assert seen == [f"{chosen} pktinfo", f"{chosen} plain"]


def test_loopback_stays_usable_and_sees_the_chosen_address(net: Net) -> None:
    """The seed: `chbind --ip eth0 telnet localhost` connects from eth0's address."""
    chosen = net.addr(4, 3)
    with background(net.in_ns(PY, "-c", TCP_SERVER, "127.0.0.1", "1")) as server:
        port = server.next_line()
        assert probe(net, ["--ip", chosen], f"connect=127.0.0.1,{port}") == [chosen]
        assert server.next_line() == chosen


def test_a_family_without_a_chosen_address_is_closed(net: Net) -> None:
    v6_only = probe(net, ["--ip", net.addr(6, 1)],
                    "bind=0.0.0.0", f"connect={net.addr(4, 2)},9")
    assert v6_only == ["EADDRNOTAVAIL", "ENETUNREACH"]

    v4_only = probe(net, ["--ip", net.addr(4, 3)],
                    "bind=::", f"bind={net.addr(6, 1)}", f"connect={net.addr(6, 2)},9")
    # A dual-stack listener on :: still serves the IPv4 address.
    assert v4_only == [f"::ffff:{net.addr(4, 3)}", "EADDRNOTAVAIL", "ENETUNREACH"]


def test_raw_and_ping_sockets_are_refused(net: Net) -> None:
    code = PRELUDE + """
for kind, proto in ((socket.SOCK_RAW, socket.IPPROTO_ICMP), (socket.SOCK_RAW, socket.IPPROTO_UDP),
                    (socket.SOCK_DGRAM, socket.IPPROTO_ICMP)):
    try:
        socket.socket(socket.AF_INET, kind, proto).close()
        print("made")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""
    # Let everyone make ping sockets, in this namespace only (the sysctl is per netns).
    run(net.in_ns("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"))
    assert run(net.in_ns(PY, "-c", code)).stdout.split() == ["made", "made", "made"]
    out = net.chbind("--silent", "--ip", net.addr(4, 1), PY, "-c", code).stdout.split()
    assert out == ["EPERM", "EPERM", "EPERM"]


# --- devices, children, nesting -------------------------------------------------

def test_ip_dev_means_every_address_of_the_device(net: Net) -> None:
    subnet_bcast = f"198.18.{net.subnet}.255"
    res = net.chbind("--ip", net.dev, PY, "-c", PROBE,
                     "bind=0.0.0.0", "bind=::", f"bind={subnet_bcast}")
    addrs = parse_announce(res.stdout)
    assert addrs[:2] == [net.addr(4, 1), net.addr(4, 3)]  # primary first
    assert sorted(addrs[2:]) == sorted([net.addr(6, 1), net.addr(6, 3)])  # not fe80::
    # The device's broadcast address is bindable: the seed took it from the device.
    assert res.stdout.splitlines()[1:] == [net.addr(4, 1), addrs[2], subnet_bcast]


def test_children_of_the_command_are_confined_too(net: Net) -> None:
    # A grandchild, started in the background by a shell.
    script = f'{PY} -c "$1" bind=0.0.0.0 bind={net.addr(4, 3)} & wait'
    out = net.chbind("--silent", "--ip", net.addr(4, 1), "sh", "-c", script, "sh",
                     PROBE).stdout.split()
    assert out == [net.addr(4, 1), "EADDRNOTAVAIL"]


def test_nested_chbind_can_only_narrow(net: Net) -> None:
    a1, a3 = net.addr(4, 1), net.addr(4, 3)
    narrowed = probe(net, ["--ip", a1, "--ip", a3, CHBIND, "--silent", "--ip", a3],
                     "bind=0.0.0.0", f"bind={a1}")
    assert narrowed == [a3, "EADDRNOTAVAIL"]
    widened = probe(net, ["--ip", a1, CHBIND, "--silent", "--ip", a3],
                    "bind=0.0.0.0", f"bind={a3}")
    assert widened == ["EADDRNOTAVAIL", "EADDRNOTAVAIL"]


# --- refusals -----------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--ip", "198.18.0.300"], "neither an IP address nor a network device"),
    (["--ip", "nosuchdev0"], "neither an IP address nor a network device"),
    ([f"--ip=198.18.0.{i}" for i in range(1, 18)], "too many addresses: 17 (at most 16)"),
    (["--ip", "0.0.0.0"], "unspecified address"),
    (["--ip", "fe80::1"], "link-local"),
    (["--ip", "198.18.0.1", "--bcast", "fd00::1"], "--bcast"),
    ([], "no address given"),
])
def test_bad_arguments_are_refused_and_nothing_runs(
        net: Net, args: list[str], message: str) -> None:
    res = net.chbind(*args, "echo", "RAN", check_rc=2)
    assert res.stderr.startswith("chbind: ") and message in res.stderr, res.stderr
    assert "RAN" not in res.stdout


def test_no_command_is_refused(net: Net) -> None:
    res = net.chbind("--ip", net.addr(4, 1), check_rc=2)
    assert "no command given" in res.stderr


def test_unprivileged_caller_is_refused(net: Net) -> None:
    res = run(net.in_ns("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        CHBIND, "--ip", net.addr(4, 1), "echo", "RAN"), check_rc=1)
    assert "must be run as root" in res.stderr, res.stderr
    assert "RAN" not in res.stdout


def test_without_cgroup_v2_chbind_refuses_rather_than_run_unconfined(net: Net) -> None:
    v2 = tracking_hierarchy().mount
    # Hide the v2 tree in a mount namespace of this command's own.
    res = run(net.in_ns("unshare", "--mount", "sh", "-c", f'umount -l {v2} && exec "$@"', "sh",
                        CHBIND, "--ip", net.addr(4, 1), "echo", "RAN"), check_rc=1)
    assert "cgroup v2 is not mounted" in res.stderr, res.stderr
    assert "the command was not run" in res.stderr
    assert "RAN" not in res.stdout
