"""reducecap: run a command with a lower capability ceiling, as in the seed.

    reducecap [--secure] [--show] [--flag lock] [--CAP_NAME]... [CMD [ARG...]]

Each --CAP_NAME (e.g. --CAP_NET_RAW, or --NET_RAW) removes that capability
from the bounding set; --secure removes everything outside vpanel's default
ceiling. The command and all it runs, setuid programs included, can never
hold more. --show prints the current sets (and is all that runs without CMD).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hostagent import caps as capmod
from hostagent import seccomp, syscalls
from hostagent.cli.capopts import apply_cap_words


def _show() -> None:
    eff, perm, inh = syscalls.capget()
    bnd = capmod.to_mask(c for c in range(capmod.last_cap() + 1) if syscalls.capbset_read(c))
    for label, mask in (("Bounding", bnd), ("Effective", eff), ("Permitted", perm),
                        ("Inheritable", inh)):
        names = capmod.names(capmod.from_mask(mask))
        print(f"{label:<12} {mask:016x} {' '.join(names) if names else '-'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    secure = show = lock = False
    remove: list[str] = []
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--":
            break
        if opt == "--secure":
            secure = True
        elif opt == "--show":
            show = True
        elif opt == "--flag":
            flag = args.pop(0) if args else ""
            if flag != "lock":
                print(f"reducecap: unsupported flag {flag!r} (only 'lock')", file=sys.stderr)
                return 2
            lock = True
        elif opt in ("--help", "-h"):
            print(__doc__)
            return 0
        else:
            remove.append("!" + opt[2:])
    try:
        start = frozenset(c for c in range(capmod.last_cap() + 1) if syscalls.capbset_read(c))
        keep = apply_cap_words(start, remove, secure=secure)
        for cap in sorted(start - keep):
            syscalls.capbset_drop(cap)
        if lock:
            seccomp.load(seccomp.SeccompPolicy(deny=()).with_lock())
        if show:
            _show()
        if not args:
            return 0 if show else _usage()
        os.execvp(args[0], args)
    except (capmod.CapabilityError, OSError) as e:
        print(f"reducecap: {e}", file=sys.stderr)
        return 1


def _usage() -> int:
    print("reducecap: no command given", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
