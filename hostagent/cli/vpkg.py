"""vpkg: run each guest's own package manager in several or all guests (the seed's vrpm).

    vpkg [--start] [--unify [--ref REF]] ALL|GUEST... -- ARGS...

    vpkg web db -- install -y nginx
    vpkg ALL -- upgrade -y
    vpkg --unify ALL -- upgrade -y

For each guest in turn (ALL: every guest with a NAME.conf, in name order) the
package manager found in its root (apt-get, dnf, yum, apk, rpm or dpkg) runs
inside the guest's context with ARGS, as guest root, with an empty stdin (so
give -y, --assumeyes or --noconfirm). Each guest's output follows a header
`== NAME (MANAGER) ==` and ends with `-- NAME: RESULT`; a table NAME MANAGER
RESULT closes the report.

    --start    start a stopped guest for the command and stop it afterwards
               (without it, a stopped guest is reported and left alone)
    --unify    after every guest succeeded, re-unify them with hostagent.unify
    --ref REF  the reference guest to unify against (default: the first guest)

Exit status: 0 if every guest ran its package manager and it exited 0; 1 if
any guest failed, was not running, has no package manager or does not exist,
or re-unification failed; 2 for a usage error; 3 if every guest succeeded but
--unify was asked for and this install has no re-unification (hostagent.unify).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hostagent import pkg
from hostagent.guest import GuestError
from hostagent.names import InvalidName, check_name
from hostagent.paths import Paths
from hostagent.views import stdout_closed

USAGE = "vpkg [--start] [--unify [--ref REF]] ALL|GUEST... -- ARGS..."
EXIT_UNIFY_UNAVAILABLE = 3


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vpkg", usage=USAGE, add_help=False)
    p.add_argument("--start", action="store_true")
    p.add_argument("--unify", action="store_true")
    p.add_argument("--ref")
    p.add_argument("guests", nargs="+")
    return p


def _usage_error(msg: str) -> int:
    print(f"vpkg: {msg}\nusage: {USAGE}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    left = args[:args.index("--")] if "--" in args else args
    if "-h" in left or "--help" in left:
        print(__doc__)
        return 0
    if "--" not in args:
        return _usage_error("the package manager's arguments follow '--'")
    command = args[len(left) + 1:]
    try:
        opts = _parser().parse_args(left)
    except SystemExit as e:  # argparse has printed what was wrong
        return e.code if isinstance(e.code, int) else 2
    paths = Paths.from_env()
    try:
        pkg.check_args(command)
        names = pkg.select_guests(paths, opts.guests)
        if opts.ref is not None and not opts.unify:
            raise pkg.PkgError("--ref goes with --unify")
        ref, others = _unify_plan(paths, opts.ref, names) if opts.unify else ("", [])
    except (pkg.PkgError, InvalidName) as e:
        return _usage_error(str(e))
    if not names:
        print(f"vpkg: no vservers (no NAME.conf in {paths.confdir})", file=sys.stderr)
        return 0
    try:
        outcomes = pkg.run_all(paths, names, command, output=_out, start=opts.start)
        if not all(o.ok for o in outcomes):
            if opts.unify:
                print("vpkg: not re-unifying: not every guest succeeded", file=sys.stderr)
            return 1
        if opts.unify:
            return _reunify(paths, ref, others)
        return 0
    except BrokenPipeError:
        return stdout_closed()
    except (GuestError, OSError, ValueError) as e:
        print(f"vpkg: {e}", file=sys.stderr)
        return 1


def _unify_plan(paths: Paths, ref: str | None,
                names: list[str]) -> tuple[str, list[str]]:
    """The reference guest and the guests to unify with it; refused if there are none."""
    if not names:
        return "", []
    chosen = names[0] if ref is None else check_name(ref)
    if not paths.conf(chosen).exists():
        raise pkg.PkgError(f"--ref {chosen}: no such vserver")
    others = [n for n in names if n != chosen]
    if not others:
        raise pkg.PkgError("--unify needs a guest besides the reference: name two guests, "
                           "or the reference with --ref REF")
    return chosen, others


def _reunify(paths: Paths, ref: str, others: list[str]) -> int:
    try:
        result = pkg.reunify(paths, ref, others, output=_out)
    except pkg.UnifyUnavailable as e:
        print(f"vpkg: re-unification is not available on this install: {e}; "
              "the package manager runs all succeeded", file=sys.stderr)
        return EXIT_UNIFY_UNAVAILABLE
    # hostagent.unify is another module's, and what it raises is its own
    # business: any failure of it is reported here and fails the command.
    except Exception as e:
        print(f"vpkg: re-unification of {', '.join(others)} with {ref} failed: {e}",
              file=sys.stderr)
        return 1
    done = f"re-unified {', '.join(others)} with {ref}"
    _out((done + (f": {result}" if result is not None else "") + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
