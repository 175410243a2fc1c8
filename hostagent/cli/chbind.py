"""chbind: run a command that may use only the chosen IP addresses, as in the seed.

    chbind [--silent] [--ip IP[/N|/MASK]|DEV]... [--bcast B|DEV] CMD [ARG...]

The command and every child it starts may bind only to the chosen addresses
(a bind to 0.0.0.0 or :: gets the first address of that family), and their
outgoing TCP connections and UDP datagrams leave from the first address.
Loopback stays usable. `--ip DEV` means every address of network device DEV.
Up to 16 addresses, IPv4 and IPv6. Root only.

The confinement is a set of cgroup BPF programs (hostagent.bpf) attached to a
cgroup of its own, `<VSERVER_CGROUP or vpanel>/chbind-<pid>` in the cgroup v2
hierarchy; the command is cloned straight into it, so it is never unconfined.
When the command exits its cgroup goes with it, unless it left processes
running (the seed's `chbind --ip eth0 /etc/init.d/httpd start` leaves a
daemon): they stay in the cgroup, confined, and a later chbind removes the
cgroup once it is empty. See docs/chbind.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_interface

from hostagent import bpf, syscalls
from hostagent.cgroup import (
    Cgroup,
    CgroupError,
    Hierarchy,
    cgroup_base,
    cgroup_of,
    tracking_hierarchy,
)

IPAddress = IPv4Address | IPv6Address
LIMITED_BROADCAST = IPv4Address("255.255.255.255")  # the seed's default --bcast
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGQUIT)  # the terminal sends them to the command too


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class ChbindError(Exception):
    """The confinement could not be set up: exit status 1, the command never runs."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chbind", description=__doc__.split("\n\n")[0])
    p.add_argument("--ip", action="append", default=[], metavar="IP|DEV",
                   help="an address the command may use (IP, IP/N or IP/MASK), or every "
                        "address of device DEV; repeatable, at most 16 addresses in all")
    p.add_argument("--bcast", metavar="B|DEV",
                   help="IPv4 broadcast address the command may also bind to (default: the "
                        "device's with --ip DEV, else 255.255.255.255)")
    p.add_argument("--silent", action="store_true", help="do not print the addresses")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


# --- addresses ------------------------------------------------------------------

@dataclass
class Device:
    name: str
    addresses: list[IPAddress] = field(default_factory=list)
    broadcast: IPv4Address | None = None


def parse_address(text: str) -> IPAddress | None:
    """IP, IP/N or IP/MASK (the seed's syntax) as an address; None if TEXT is none.

    The prefix is accepted so that seed-style entries (`1.2.3.4/255.255.255.0`)
    keep working; it describes the address's network and does not widen what
    the command may use: only the address itself is chosen.
    """
    try:
        iface: IPv4Interface | IPv6Interface = ip_interface(text)
    except ValueError:
        return None
    addr = iface.ip
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def check_usable(addr: IPAddress, given: str) -> None:
    if addr.is_unspecified:
        raise UsageError(f"{given}: the unspecified address cannot be chosen "
                         "(chbind exists to replace it with a real one)")
    if addr.is_multicast:
        raise UsageError(f"{given}: a multicast address cannot be a source address")
    if isinstance(addr, IPv6Address) and addr.is_link_local:
        raise UsageError(f"{given}: IPv6 link-local addresses need an interface scope, "
                         "which a bind rewrite cannot supply; choose a global address")
    if isinstance(addr, IPv4Address) and addr == LIMITED_BROADCAST:
        raise UsageError(f"{given}: the broadcast address cannot be a source (see --bcast)")


def lookup_device(name: str) -> Device | None:
    """The addresses of device NAME in this network namespace, read over netlink;
    None if there is no such device.

    IPv4 first, in the kernel's order (primary before secondary), then IPv6;
    IPv6 link-local addresses are left out (see check_usable).
    """
    from pyroute2 import IPRoute  # netlink; imported only when a device is named

    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)
            if not index:
                return None
            messages = list(ipr.get_addr(index=index[0]))
    except (OSError, ValueError) as e:  # pyroute2 rejects impossible names itself
        raise UsageError(f"cannot read the addresses of {name!r}: {e}") from e
    dev = Device(name)
    v6: list[IPAddress] = []
    for msg in messages:
        if msg.get("family") == socket.AF_INET:
            local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if local is None:
                continue
            addr4 = IPv4Address(local)
            dev.addresses.append(addr4)
            bcast = msg.get("IFA_BROADCAST")
            if dev.broadcast is None and bcast:
                dev.broadcast = IPv4Address(bcast)
        elif msg.get("family") == socket.AF_INET6:
            addr6 = IPv6Address(msg.get("IFA_ADDRESS"))
            if not addr6.is_link_local:
                v6.append(addr6)
    dev.addresses += v6
    return dev


def resolve(ips: Sequence[str], bcast: str | None) -> bpf.AddressPolicy:
    """The address policy the --ip and --bcast arguments ask for."""
    if not ips:
        raise UsageError("no address given: use --ip IP or --ip DEV")
    chosen: list[IPAddress] = []
    dev_bcast: IPv4Address | None = None
    for text in ips:
        addr = parse_address(text)
        if addr is not None:
            check_usable(addr, text)
            chosen.append(addr)
            continue
        dev = lookup_device(text)
        if dev is None:
            raise UsageError(f"{text!r} is neither an IP address nor a network device")
        if not dev.addresses:
            raise UsageError(f"device {text} has no usable address")
        chosen += dev.addresses
        dev_bcast = dev_bcast or dev.broadcast
    unique = list(dict.fromkeys(chosen))
    if len(unique) > bpf.MAX_ADDRESSES:
        raise UsageError(f"too many addresses: {len(unique)} (at most {bpf.MAX_ADDRESSES})")
    return bpf.AddressPolicy(
        ipv4=tuple(a for a in unique if isinstance(a, IPv4Address)),
        ipv6=tuple(a for a in unique if isinstance(a, IPv6Address)),
        broadcast=_broadcast(bcast) if bcast is not None else dev_bcast or LIMITED_BROADCAST,
    )


def _broadcast(text: str) -> IPv4Address:
    """--bcast: an IPv4 address, or a device whose broadcast address is taken (as the seed)."""
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    dev = lookup_device(text)
    if dev is None:
        raise UsageError(f"--bcast {text!r} is neither an IPv4 address nor a network device")
    if dev.broadcast is None:
        raise UsageError(f"--bcast {text}: the device has no IPv4 broadcast address")
    return dev.broadcast


# --- the cgroup -----------------------------------------------------------------

def v2_hierarchy() -> Hierarchy:
    """The cgroup v2 mount; BPF programs attach to v2 directories only."""
    try:
        h: Hierarchy | None = tracking_hierarchy()
    except CgroupError:
        h = None
    if h is None or h.version != 2:
        raise ChbindError("cgroup v2 is not mounted, and the BPF programs that pin the "
                          "command to its addresses attach to cgroup v2 only "
                          "(mount -t cgroup2 none /sys/fs/cgroup/unified)")
    return h


def cgroup_parent(h: Hierarchy) -> str:
    """Where this chbind's cgroup goes.

    Normally under the vpanel base. A caller that already lives below the base
    (an outer chbind, a guest) gets its cgroup below its own: the outer
    programs keep running for the inner one (BPF_F_ALLOW_MULTI), so a nested
    chbind can only narrow the addresses, and nothing leaves its guest's cgroup.
    """
    try:
        base = cgroup_base()
    except CgroupError as e:
        raise ChbindError(str(e)) from e
    mine = cgroup_of(os.getpid(), h)
    if mine is not None and (mine == base or mine.startswith(base + "/")):
        return mine
    return base


def _collect_empty(parent: str, h: Hierarchy) -> None:
    """Remove the cgroups of earlier chbinds whose daemons have all ended."""
    for path in (h.mount / parent).glob("chbind-*"):
        cg = Cgroup(f"{parent}/{path.name}", h)
        if not cg.populated():
            with contextlib.suppress(OSError):
                cg.remove()


def _fresh_cgroup(parent: str, h: Hierarchy) -> Cgroup:
    """PARENT/chbind-<pid>, or with a suffix if a chbind that had our pid left
    its cgroup, with daemons still confined in it, behind."""
    _collect_empty(parent, h)
    for n in range(100):
        cg = Cgroup(f"{parent}/chbind-{os.getpid()}{f'.{n}' if n else ''}", h)
        if cg.exists() and not cg.populated():
            cg.remove()  # stale and empty
        if not cg.exists():
            return cg
    raise ChbindError(f"no free cgroup name under {h.mount / parent}")


# --- running the command --------------------------------------------------------

def announce(policy: bpf.AddressPolicy) -> str:
    return "ipv4root is now " + " ".join(str(a) for a in (*policy.ipv4, *policy.ipv6))


def run_confined(policy: bpf.AddressPolicy, cmd: Sequence[str], *, silent: bool) -> int:
    """Confine a fresh cgroup to POLICY, run CMD in it, wait; returns its exit status."""
    h = v2_hierarchy()
    cg = _fresh_cgroup(cgroup_parent(h), h)
    # The signals we relay stay blocked until the command's pid is known: a
    # SIGTERM that came during setup would otherwise kill us and leave the
    # cgroup behind. Pending ones are relayed once the command runs.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED_SIGNALS, *IGNORED_SIGNALS})
    try:
        with contextlib.ExitStack() as undo:
            cg.create()
            undo.callback(_destroy, cg)
            fd = cg.clone_fd()
            if fd is None:  # v2_hierarchy() made sure of v2
                raise ChbindError(f"{cg.path}: not a cgroup v2 directory")
            undo.callback(os.close, fd)
            try:
                bpf.confine_cgroup(fd, policy)
            except bpf.BPFError as e:
                raise ChbindError(f"cannot attach the BPF programs to {cg.path}: "
                                  f"{e.strerror}{_attach_hint(e)}") from e
            if not silent:
                print(announce(policy), flush=True)
            sys.stderr.flush()
            status = _spawn_and_wait(fd, cmd, old_mask)
            # From here the cgroup outlives a failure of ours only if it has
            # processes to keep confined.
            undo.pop_all()
            os.close(fd)
            _finish(cg)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return status


def _finish(cg: Cgroup) -> None:
    """Remove the cgroup, unless the command left daemons in it: they stay confined."""
    if cg.populated():
        return
    with contextlib.suppress(OSError):
        cg.remove()


def _attach_hint(e: OSError) -> str:
    if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
        return " (does this kernel have CONFIG_CGROUP_BPF and cgroup sock_addr hooks?)"
    return ""


def _destroy(cg: Cgroup) -> None:
    """After a failed set-up: kill anything in the cgroup and remove it (and so the programs)."""
    try:
        cg.kill()
        if not cg.wait_empty(5):
            raise CgroupError(errno.EBUSY, "processes survived SIGKILL for 5 s")
        cg.remove()
    except OSError as e:
        # Reported, not raised: the command's own exit status still stands.
        print(f"chbind: warning: could not remove {cg.path}: {e}", file=sys.stderr)


def _spawn_and_wait(cgroup_fd: int, cmd: Sequence[str], old_mask: Iterable[int]) -> int:
    """Clone the command into the cgroup, so that it is confined from its first
    instruction; relay SIGTERM and SIGHUP to it, ignore the terminal's SIGINT
    and SIGQUIT (they reach the command anyway), and wait for it."""
    pid = syscalls.fork_into(0, cgroup_fd)
    if pid == 0:
        code = 127  # as sh(1): 127 not found, 126 found but not runnable
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execvp(cmd[0], list(cmd))
        except OSError as e:
            code = 127 if isinstance(e, FileNotFoundError) else 126
            os.write(2, f"chbind: cannot run {cmd[0]}: {e.strerror}\n".encode())
        finally:
            os._exit(code)
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: _relay(pid, signum))
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _, status = os.waitpid(pid, 0)  # retried after a relayed signal (PEP 475)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _relay(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    try:
        if not cmd:
            raise UsageError("no command given")
        policy = resolve(a.ip, a.bcast)
    except UsageError as e:
        print(f"chbind: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("chbind: must be run as root: it creates a cgroup and loads BPF programs "
              "into the kernel", file=sys.stderr)
        return 1
    try:
        return run_confined(policy, cmd, silent=a.silent)
    except (ChbindError, OSError) as e:
        print(f"chbind: {e}; the command was not run", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
