"""vkill: signal a process of any context, the seed's way round context 1.

    vkill [--ctx N | --guest NAME] [-s SIG | -SIG] PID...

Without --ctx/--guest, PID is a host pid and vkill finds its context. With
them, PID is the pid as seen inside that context (what `ps` run in the
vserver prints), translated through NSpid. Processes of a vserver with the
`private` flag are refused, as the seed's kernel refused context 1 and the
host. The signal goes through a pidfd, opened and then checked to still be
the same process in the same cgroup, so a recycled pid is never hit.
SIG: a name (TERM, SIGTERM) or a number; default TERM; 0 only checks.
Exit status as kill(1): 0 when every PID was signalled, 1 otherwise.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from hostagent import conf as confmod
from hostagent import syscalls, views
from hostagent.cgroup import Cgroup, CgroupError, cgroup_of
from hostagent.names import guest_name_arg
from hostagent.paths import Paths
from hostagent.views import Context, ContextMap


class VkillError(Exception):
    """One PID could not be signalled; the message is for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # kill(1) exits 1 on bad usage too.
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vkill", description=__doc__.split("\n\n")[0])
    who = p.add_mutually_exclusive_group()
    who.add_argument("--ctx", type=int, metavar="N", help="PIDs are pids inside context N")
    who.add_argument("--guest", metavar="NAME", type=guest_name_arg,
                     help="PIDs are pids inside vserver NAME")
    p.add_argument("-s", "--signal", default="TERM", metavar="SIG", help="default TERM")
    p.add_argument("pids", nargs="+", metavar="PID")
    return p


def parse_signal(text: str) -> int:
    """A signal number from '9', 'KILL', 'SIGKILL' or 'kill'."""
    if text.isdigit():
        n = int(text)
        if n == 0 or n in set(signal.valid_signals()):
            return n
        raise ValueError(f"unknown signal {text}")
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text}") from None


def _split_dash_signal(args: list[str]) -> list[str]:
    """kill(1)'s -SIG form (-9, -KILL) becomes -s SIG, before the PIDs."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if len(arg) > 1 and arg[0] == "-" and arg[1] != "-":
            try:
                parse_signal(arg[1:])
            except ValueError:
                pass
            else:
                out += ["-s", arg[1:]]
                continue
        out.append(arg)
    return out


@dataclass(frozen=True)
class Target:
    shown: str  # how messages name it: the user's pid, and the host's if it differs
    pid: int  # host pid
    start: int  # start time, clock ticks since boot
    cgroup: str | None
    context: Context


def _host_target(pid: int, ctxmap: ContextMap, arg: str) -> Target:
    start = views.start_of(pid)
    if start is None:
        raise VkillError(f"{arg}: no such process")
    cg = cgroup_of(pid, ctxmap.hierarchy)
    shown = arg if arg == str(pid) else f"{arg} (host pid {pid})"
    return Target(shown, pid, start, cg, ctxmap.of_cgroup(cg))


def resolve(arg: str, ctxmap: ContextMap, ctx: int | None, guest: str | None) -> Target:
    """The host process PID (as written by the user) means."""
    if not arg.isdigit() or int(arg) == 0:
        raise VkillError(f"{arg}: not a process id (process groups are not signalled)")
    pid = int(arg)
    if guest is None and ctx is not None:
        guest = next((c.guest for c in ctxmap.contexts() if c.number == ctx), None)
    if guest is not None:
        st = ctxmap.states.get(guest)
        level = ctxmap.guest_level(guest)
        if st is None or level is None:
            raise VkillError(f"vserver {guest} is not running")
        host = views.host_pid_in(Cgroup(st.cgroup, ctxmap.hierarchy).procs(), level, pid)
        if host is None:
            raise VkillError(f"{pid}: no such process in vserver {guest}")
        return _checked(_host_target(host, ctxmap, arg), Context(st.context, guest), arg)
    if ctx is None or ctx == 0:
        t = _host_target(pid, ctxmap, arg)
        if ctx == 0 and t.context.number != 0:
            raise VkillError(f"{arg}: not in context 0 (it is in {t.context.number} "
                             f"{t.context.label})")
        return t
    # A chcontext context: its own PID namespace is the shallowest of its processes'.
    cg = Cgroup(f"{ctxmap.base}/ctx-{ctx}", ctxmap.hierarchy)
    procs = cg.procs()
    depths = [len(ns) for ns in map(views.nspid, procs) if ns]
    if not depths:
        raise VkillError(f"no context {ctx} is running")
    host = views.host_pid_in(procs, min(depths) - 1, pid)
    if host is None:
        raise VkillError(f"{pid}: no such process in context {ctx}")
    return _checked(_host_target(host, ctxmap, arg), Context(ctx), arg)


def _checked(t: Target, want: Context, arg: str) -> Target:
    if t.context != want:
        raise VkillError(f"{arg}: no such process in context {want.number}")
    return t


def refuse_private(t: Target, paths: Paths) -> None:
    name = t.context.guest
    if name is None:
        return
    try:
        flags = confmod.settings_from_file(paths.conf(name)).flags
    except (confmod.ConfigError, OSError) as e:
        # Fail closed: a conf we cannot read may well say private.
        raise VkillError(f"{t.shown}: cannot read {name}'s configuration ({e}); not signalled") \
            from e
    if "private" in flags:
        raise VkillError(f"{t.shown}: vserver {name} has the 'private' flag: "
                         "the host may not signal its processes")


def send(t: Target, sig: int, ctxmap: ContextMap) -> None:
    try:
        fd = syscalls.pidfd_open(t.pid)
    except OSError as e:
        raise VkillError(f"{t.shown}: no such process" if e.errno == errno.ESRCH
                         else f"{t.shown}: {e.strerror}") from e
    try:
        # The pidfd pins the process; if the pid was reused between looking
        # it up and opening it, start time or cgroup now differ.
        if views.start_of(t.pid) != t.start or cgroup_of(t.pid, ctxmap.hierarchy) != t.cgroup:
            raise VkillError(f"{t.shown}: no such process (it exited)")
        try:
            syscalls.pidfd_send_signal(fd, sig)
        except OSError as e:
            raise VkillError(f"{t.shown}: {e.strerror}") from e
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(_split_dash_signal(raw))
    try:
        sig = parse_signal(a.signal)
    except ValueError as e:
        print(f"vkill: {e}", file=sys.stderr)
        return 1
    paths = Paths.from_env()
    try:
        ctxmap = ContextMap(paths)
    except (OSError, CgroupError) as e:
        print(f"vkill: {e}", file=sys.stderr)
        return 1
    if a.guest is not None and a.guest not in ctxmap.states:
        print(f"vkill: vserver {a.guest} is not running", file=sys.stderr)
        return 1
    failed = 0
    for arg in a.pids:
        try:
            t = resolve(arg, ctxmap, a.ctx, a.guest)
            refuse_private(t, paths)
            send(t, sig, ctxmap)
        except VkillError as e:
            print(f"vkill: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
