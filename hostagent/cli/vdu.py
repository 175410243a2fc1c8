"""vdu: the space that is a guest's own, after the seed's vdu.

    vdu [--json] [--] PATH|GUEST...

For each argument, one line `ARG<TAB>NK`: the blocks (st_blocks * 512, in
KiB, rounded down) of the regular files with a single link under it, on its
own filesystem (mount points are not followed). Files with more links are
shared with other guests (vunify --hardlink) and are not counted; nor are
directories, symlinks and device nodes, as in the seed.

An argument with a '/' (or '.' or '..') is a directory. Otherwise it is a
vserver name if VSERVER_ROOTDIR has such a guest (write ./NAME for a
directory of that name). For a guest made from a template with an overlay,
the upper layer VSERVER_ROOTDIR/.overlay/NAME/upper (what the guest changed)
is what vdu counts.

Files that share blocks with another guest (vunify without --hardlink) are
counted in full: vdu reports what each file has allocated, not what is
exclusive to it; `btrfs filesystem du` tells exclusive from shared bytes.

--json prints a list of {"arg", "path", "kib", "bytes", "files"}.
Exit status 0, or 1 if a directory could not be read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hostagent import unify
from hostagent.names import NAME_RE
from hostagent.paths import Paths


def target(paths: Paths, arg: str) -> Path:
    """The directory vdu counts for ARG (see the module's docstring)."""
    if "/" not in arg and arg not in (".", "..") and NAME_RE.match(arg):
        usage = unify.usage_dir(paths, arg)
        if usage.is_dir():
            return usage
    return Path(arg)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts, literal = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args \
        else (args, [])
    if any(a in ("-h", "--help") for a in opts):
        print(__doc__)
        return 0
    as_json = "--json" in opts
    unknown = [a for a in opts if a.startswith("-") and a != "--json"]
    args = [a for a in opts if a != "--json"] + literal
    if unknown or not args:
        print(f"vdu: {'unknown option ' + unknown[0] if unknown else 'no directory given'}; "
              "use --help", file=sys.stderr)
        return 2
    paths = Paths.from_env()
    rc = 0
    records = []
    for arg in args:
        try:
            use = unify.disk_usage(target(paths, arg))
        except unify.UnifyError as e:
            print(f"vdu: {e}", file=sys.stderr)
            rc = 1
            continue
        for err in use.errors:
            print(f"vdu: {err}", file=sys.stderr)
            rc = 1
        if as_json:
            records.append({"arg": arg, "path": os.fspath(use.path), "kib": use.kib,
                            "bytes": use.bytes, "files": use.files})
        else:
            print(f"{arg}\t{use.kib}K", flush=True)
    if as_json:
        print(json.dumps(records, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
