"""vtemplate: the shared trees unified guests are built on.

    vtemplate create NAME --from GUEST | --rootfs PATH|TARBALL | --debootstrap SUITE | --busybox
    vtemplate list
    vtemplate delete NAME

A guest built with `vserver NAME build -m template TEMPLATE` shares the
template's files on disk and in the page cache and keeps its own changes to
itself (docs/storage.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hostagent import build as buildmod
from hostagent import templates
from hostagent.names import InvalidName
from hostagent.paths import Paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtemplate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    c = sub.add_parser("create", help="make a template")
    c.add_argument("name")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="guest", metavar="GUEST", help="a stopped vserver's tree")
    src.add_argument("--rootfs", metavar="PATH|TARBALL", help="a directory or tarball")
    src.add_argument("--debootstrap", metavar="SUITE", help="a Debian suite")
    src.add_argument("--busybox", action="store_true", help="a tiny busybox tree")
    sub.add_parser("list", help="templates, their size and the guests using them")
    d = sub.add_parser("delete", help="remove a template no guest uses")
    d.add_argument("name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    paths = Paths.from_env()
    try:
        if a.verb == "create":
            if a.guest:
                method, source = "guest", a.guest
            elif a.rootfs:
                method, source = "rootfs", a.rootfs
            elif a.debootstrap:
                method, source = "debootstrap", a.debootstrap
            else:
                method, source = "busybox", None
            path = templates.create(paths, a.name, method, source, log=print)
            print(f"template {a.name} created at {path}")
        elif a.verb == "list":
            print(f"{'NAME':<20} {'SIZE':>10}  GUESTS")
            for t in templates.list_templates(paths):
                print(f"{t.name:<20} {t.size_bytes // (1 << 20):>8}MB  "
                      f"{' '.join(t.guests) or '-'}")
        else:
            templates.delete(paths, a.name)
            print(f"template {a.name} deleted")
    except (templates.TemplateError, buildmod.BuildError, InvalidName, OSError) as e:
        print(f"vtemplate: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
