"""vserver NAME VERB: the seed's wrapper to build, start, stop and administer a guest.

    vserver NAME build -m copy|busybox|rootfs PATH|debootstrap SUITE [options]
    vserver NAME start|stop|restart|running|status|delete
    vserver NAME enter
    vserver NAME exec CMD [ARG...]
    vserver NAME suexec USER CMD [ARG...]
    vserver NAME service SERVICE ACTION
    vserver NAME set KEY VALUE       (rewrite NAME.conf; limits apply at once)
    vserver NAME reset [--keep PATH]...
                                     (a stopped template guest back to its template,
                                      keeping each PATH inside it; asks nothing)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hostagent import guest, wire
from hostagent.names import InvalidName, check_name
from hostagent.paths import Paths

VERBS = ("build", "start", "stop", "restart", "running", "status", "enter", "exec",
         "suexec", "service", "set", "delete", "reset")


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _build_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"vserver {name} build",
                                description="Build a new vserver's root tree and NAME.conf.")
    p.add_argument("-m", "--method", required=True,
                   help="copy | busybox | rootfs PATH|TARBALL | debootstrap SUITE")
    p.add_argument("source", nargs="?", help="directory or tarball (rootfs), suite (debootstrap)")
    p.add_argument("--hostname", help="S_HOSTNAME (default: the vserver's name)")
    p.add_argument("--ip", action="append", default=[], metavar="DEV:IP/PREFIX",
                   help="an IPROOT address; repeat for more (up to 16)")
    p.add_argument("--caps", action="append", default=[], metavar="CAP|!CAP",
                   help="S_CAPS words: CAP_NET_RAW adds, !CAP_CHOWN removes; repeatable")
    p.add_argument("--allow-unsafe-caps", action="store_true",
                   help="permit SYS_ADMIN, SYS_MODULE, SYS_RAWIO, DAC_READ_SEARCH, BPF in --caps")
    p.add_argument("--flags", action="append", default=[], metavar="FLAG",
                   help="S_FLAGS: lock sched nproc private fakeinit hideinfo ulimit")
    p.add_argument("--nice", type=int, help="S_NICE, a floor the guest cannot go below")
    p.add_argument("--ulimit", help="ULIMIT, as for the shell's ulimit: e.g. '-H -u 1000'")
    p.add_argument("--onboot", action="store_true", help="ONBOOT=yes")
    p.add_argument("--context", type=int, help="S_CONTEXT, a fixed context id (2..49151)")
    p.add_argument("--description", help="DESCRIPTION shown by the listing tools")
    p.add_argument("--disk-limit", metavar="SIZE",
                   help="DISK_LIMIT, e.g. 2G: what the guest itself may write (a btrfs qgroup, "
                        "or an XFS/ext4 project quota)")
    p.add_argument("--disk-image", action="store_true",
                   help='DISK_LIMIT_MODE="image": the limit as a filesystem image of its own')
    p.add_argument("--idmap", nargs="?", const="isolated", default="none",
                   choices=("isolated", "shared", "none"),
                   help="IDMAP: isolated (the default of a bare --idmap) gives the guest a "
                        "private range of 65536 host ids, so that its root is no host root; "
                        "without it, none")
    return p


def _words(values: Sequence[str]) -> list[str]:
    return [w for v in values for w in v.split()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    silent = False
    while args and args[0] in ("--silent", "-s"):
        silent = True
        args.pop(0)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, verb, rest = args[0], args[1], args[2:]
    try:
        check_name(name)
    except InvalidName as e:
        print(f"vserver: {e}", file=sys.stderr)
        return 2
    if verb not in VERBS:
        print(f"vserver: unknown command {verb!r}; use one of {', '.join(VERBS)}",
              file=sys.stderr)
        return 2
    paths = Paths.from_env()
    out = None if silent else _out
    try:
        return _run(paths, name, verb, rest, out)
    except (guest.GuestError, OSError, ValueError) as e:
        print(f"vserver: {e}", file=sys.stderr)
        return 1


def _run(paths: Paths, name: str, verb: str, rest: list[str], out: guest.Output) -> int:
    if verb == "build":
        a = _build_parser(name).parse_args(rest)
        opts = guest.BuildOptions(
            method=a.method, source=a.source, hostname=a.hostname, ips=a.ip,
            caps=_words(a.caps), flags=_words(a.flags), nice=a.nice, ulimit=a.ulimit,
            onboot=a.onboot, context=a.context, allow_unsafe_caps=a.allow_unsafe_caps,
            description=a.description, disk_limit=a.disk_limit, disk_image=a.disk_image,
            idmap=a.idmap,
        )
        guest.build(paths, name, opts, log=lambda m: out and out((m + "\n").encode()))
        if out:
            out(f"vserver {name} built ({paths.conf(name)}, {paths.root(name)})\n".encode())
        return 0
    if verb == "start":
        st = guest.start(paths, name, output=out)
        if out:
            out(f"vserver {name} started, context {st.context}\n".encode())
        return 0
    if verb == "stop":
        if not guest.stop(paths, name, output=out) and out:
            out(f"vserver {name} is not running\n".encode())
        return 0
    if verb == "restart":
        guest.stop(paths, name, output=out)
        st = guest.start(paths, name, output=out)
        if out:
            out(f"vserver {name} restarted, context {st.context}\n".encode())
        return 0
    if verb == "running":
        up = guest.running(paths, name)
        if out:
            out(f"Vserver {name} is {'running' if up else 'not running'}\n".encode())
        return 0 if up else 1
    if verb == "status":
        s = guest.status(paths, name)
        print(s.text())
        return 0 if s.running else 1
    if verb == "delete":
        guest.delete(paths, name)
        return 0
    if verb == "enter":
        return guest.enter_shell(paths, name)
    if verb == "exec":
        if not rest:
            raise guest.GuestError("usage: vserver NAME exec CMD [ARG...]")
        return guest.exec_in(paths, name, rest)
    if verb == "suexec":
        if len(rest) < 2:
            raise guest.GuestError("usage: vserver NAME suexec USER CMD [ARG...]")
        return guest.exec_in(paths, name, rest[1:], user=rest[0])
    if verb == "set":
        if len(rest) != 2:
            raise guest.GuestError("usage: vserver NAME set KEY VALUE (an empty VALUE removes it)")
        for line in guest.set_key(paths, name, rest[0], rest[1]):
            print(line)
        return 0
    if verb == "reset":
        return _reset(paths, name, rest, out)
    if verb == "service":
        if len(rest) != 2:
            raise guest.GuestError("usage: vserver NAME service SERVICE ACTION")
        return guest.service(paths, name, rest[0], rest[1])
    raise AssertionError(verb)


def _reset(paths: Paths, name: str, rest: list[str], out: guest.Output) -> int:
    p = argparse.ArgumentParser(
        prog=f"vserver {name} reset",
        description="Empty a stopped template guest's own layer: it sees its template "
                    "again, but for the paths kept.")
    p.add_argument("--keep", action="append", default=[], metavar="PATH",
                   help=f"an absolute path inside the guest to keep, with all below it; "
                        f"repeat for more (up to {wire.RESET_KEEP_MAX})")
    a = p.parse_args(rest)
    try:
        keep = wire.ResetRequest.from_json({"keep": a.keep}).keep
    except wire.WireError as e:
        print(f"vserver: --keep: {e.message}", file=sys.stderr)
        return 2
    result = guest.reset(paths, name, keep)
    if out:
        out(f"vserver {name} reset to its template\n".encode())
        for what, items in (("kept", result.kept), ("not kept (below a symlink or a file)",
                                                    result.refused)):
            for item in items:
                out(f"  {what}: {item}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
