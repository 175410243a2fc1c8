"""chcontext: run a command in a new security context, as in the seed.

    chcontext [--ctx N] [--hostname H] [--domainname D|none] [--cap CAP|!CAP]...
              [--secure] [--flag F]... [--silent] [--disconnect] CMD [ARG...]

The command gets new PID, mount, UTS, IPC and cgroup namespaces and its own
/proc: it sees only its own processes and cannot signal anything outside.
When it exits, the context is gone. Root may name the context (--ctx N), and
naming the context of a running vserver enters that vserver. Any user may
run chcontext: without root it goes through a user namespace that maps the
caller's own ids, so nothing is gained but isolation.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from hostagent import caps as capmod
from hostagent import context, guest, seccomp, syscalls
from hostagent.cgroup import Cgroup, cgroup_base
from hostagent.cli.capopts import apply_cap_words
from hostagent.contexts import ContextInUse, ContextRegistry, ContextsExhausted
from hostagent.paths import Paths

FLAGS = ("lock", "hideinfo", "nproc", "sched", "private", "fakeinit", "ulimit")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chcontext", description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, help="context number (root only); a running vserver's "
                   "number enters it")
    p.add_argument("--hostname", help="host name inside the context")
    p.add_argument("--domainname", help="NIS domain name inside; 'none' clears it")
    p.add_argument("--cap", action="append", default=[], metavar="CAP|!CAP",
                   help="add back (CAP) or remove (!CAP) a capability; repeatable")
    p.add_argument("--secure", action="store_true",
                   help="lower the ceiling to vpanel's default and add the seccomp filter")
    p.add_argument("--flag", action="append", default=[], choices=FLAGS,
                   help="a context flag (lock, hideinfo act here; the rest are for vservers)")
    p.add_argument("--silent", action="store_true", help="do not print the context number")
    p.add_argument("--disconnect", action="store_true",
                   help="do not wait for the command; leave it running in its context")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


def _user_rundir() -> Path:
    """Where an unprivileged caller's context numbers are kept."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "vpanel"
    return Path(f"/tmp/vpanel-{os.getuid()}")  # noqa: S108 - per-user, mode 0700


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        print("chcontext: no command given", file=sys.stderr)
        return 2
    root = os.geteuid() == 0
    paths = Paths.from_env()
    try:
        if a.ctx is not None:
            if not root:
                raise guest.GuestError("only root may choose a context number")
            name = guest.find_guest_by_context(paths, a.ctx)
            if name is not None:
                return guest.exec_in(paths, name, cmd)
        return _new_context(a, cmd, root, paths)
    except (guest.GuestError, context.LaunchError, capmod.CapabilityError, OSError) as e:
        print(f"chcontext: {e}", file=sys.stderr)
        return 1


def _current_bounding_set() -> frozenset[int]:
    return frozenset(c for c in range(capmod.last_cap() + 1) if syscalls.capbset_read(c))


def _new_context(a: argparse.Namespace, cmd: list[str], root: bool, paths: Paths) -> int:
    caps = apply_cap_words(_current_bounding_set(), a.cap, secure=a.secure)
    policy = seccomp.SeccompPolicy() if a.secure else None
    if "lock" in a.flag:
        policy = (policy or seccomp.SeccompPolicy(deny=())).with_lock()
    domain = None if a.domainname is None else ("" if a.domainname == "none" else a.domainname)
    rundir = paths.rundir if root else _user_rundir()
    if root:
        paths.ensure()
    reg = ContextRegistry(rundir)
    try:
        n = reg.allocate(a.ctx, in_use=guest.used_contexts(paths) if root else ())
    except (ContextInUse, ContextsExhausted) as e:
        raise guest.GuestError(str(e)) from e
    cg = None
    try:
        if root:
            cg = Cgroup(f"{cgroup_base()}/ctx-{n}")
            cg.create()
        spec = context.ContextSpec(
            root=None, caps=caps, hostname=a.hostname, domainname=domain, seccomp=policy,
            cgroup=cg, hideinfo="hideinfo" in a.flag, userns=not root,
        )
        if not a.silent:
            print(f"New security context is {n}", flush=True)
        init_pid = context.launch_init(spec, argv=cmd)
        reg.record(n, init_pid)
        if a.disconnect:
            cg = None  # the context outlives us; its cgroup stays with it
            return 0
        return _wait(init_pid)
    finally:
        if cg is not None:
            cg.kill()
            cg.wait_empty(5)
            cg.remove()
        if not a.disconnect:
            reg.release(n)


def _wait(pid: int) -> int:
    # The terminal's signals reach the whole foreground group anyway; keep
    # ours from killing us before the context's init has exited.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
