"""vunify: store the files that guests have in common once, after the seed's vunify.

    vunify [--test] [--undo] [--hardlink] [--path] [--exclude GLOB]... REF GUEST...

REF and each GUEST are vserver names (directories under VSERVER_ROOTDIR), or
with --path absolute directories. A regular file is shared when REF and GUEST
have it at the same path with the same mode, owner, size and content, and it
lies outside the excluded paths (/etc, /var, /home, /root, /tmp, /run and the
rest of hostagent.unify.DEFAULT_EXCLUDES; --exclude adds a pattern, matched
against the path inside the guest, where * also matches '/').

By default the two files share their *blocks* (FIDEDUPERANGE, or FICLONE
after a byte-for-byte comparison), on btrfs or XFS: each stays an independent
file that either guest may change or delete. On a filesystem that cannot
share blocks vunify says so and changes nothing.

  --test      report what would be shared and saved; change nothing
  --undo      give GUEST private copies of what it shares with REF, blocks
              or hard links (--hardlink changes nothing with it)
  --hardlink  the seed's way: GUEST's file becomes a hard link to REF's and
              the inode is made immutable, in REF too (see the warning it prints)
  --path      REF and GUEST are directories, not vserver names

One line per GUEST: files considered, shared, bytes saved. Exit status 0,
1 when a file or a guest failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hostagent import unify
from hostagent.names import InvalidName
from hostagent.paths import Paths

HARDLINK_WARNING = """\
vunify: --hardlink: every shared file becomes ONE inode, made immutable (FS_IMMUTABLE_FL).
  - Root inside REF and inside each GUEST can no longer change, delete, rename or replace
    those files: the guests lack CAP_LINUX_IMMUTABLE, and mainline Linux has no
    immutable-linkage-invert (the seed's IUNLINK) that let a guest unlink its copy.
  - So package upgrades and removals that touch them fail (dpkg/rpm get EPERM) until
    `vunify --undo REF GUEST` gives the guest private copies again.
  - link(2) onto an immutable file fails with EPERM, so linking one more guest clears the
    flag on REF's file for the moment of the link and sets it again.
  - Stop both guests first: a process holding the old file keeps it, and a write to
    REF's file during the run would reach GUEST.
  Without --hardlink, vunify shares blocks instead and none of this applies."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: {message}\n")


_paras = __doc__.split("\n\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vunify", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(_paras[i] for i in (2, 3, 5)))
    p.add_argument("--test", action="store_true", help="report only; change nothing")
    p.add_argument("--undo", action="store_true", help="unshare: private copies again")
    p.add_argument("--hardlink", action="store_true",
                   help="hard links + immutable, the seed's way (read the warning)")
    p.add_argument("--path", action="store_true", help="REF and GUEST are absolute directories")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="also leave out paths matching GLOB, e.g. '/opt/app/data'")
    p.add_argument("ref", metavar="REF", help="the reference vserver, whose files are kept")
    p.add_argument("guests", nargs="+", metavar="GUEST", help="vservers to share them with")
    return p


def _resolve(paths: Paths, arg: str, by_path: bool) -> Path:
    if by_path:
        p = Path(arg)
        if not p.is_absolute():
            raise unify.UnifyError(f"{arg}: with --path, give an absolute directory")
        if not p.is_dir():
            raise unify.UnifyError(f"{arg}: not a directory")
        return p
    return unify.guest_root(paths, arg)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    paths = Paths.from_env()
    try:
        ref = _resolve(paths, a.ref, a.path)
        guests = [(g, _resolve(paths, g, a.path)) for g in a.guests]
    except (InvalidName, unify.UnifyError) as e:
        print(f"vunify: {e}", file=sys.stderr)
        return 2
    for label, root in guests:
        if root.resolve() == ref.resolve():
            print(f"vunify: {label} is REF itself", file=sys.stderr)
            return 2
    if a.hardlink and not a.undo:
        print(HARDLINK_WARNING, file=sys.stderr)
    rc = 0
    for label, root in guests:
        try:
            if a.undo:
                report = unify.undo_tree(ref, root, test=a.test, excludes=a.exclude, label=label)
            else:
                report = unify.unify_tree(ref, root, hardlink=a.hardlink, test=a.test,
                                          excludes=a.exclude, label=label)
        except (unify.UnifyError, OSError) as e:
            print(f"vunify: {e}", file=sys.stderr)
            rc = 1
            continue
        print(report.text(undo=a.undo), flush=True)
        for path, why in report.skipped:
            print(f"vunify: {label}: {path}: skipped: {why}", file=sys.stderr)
        for path, err in report.failed:
            print(f"vunify: {label}: {path}: {err}", file=sys.stderr)
        if report.failed:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
