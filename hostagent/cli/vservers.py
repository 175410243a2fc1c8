"""vservers start|stop|restart|status: every vserver at once, as the seed's init script.

    vservers start [--attempts N] [--delay SECONDS]
        start the vservers with ONBOOT=yes, lower PRIORITY first; a failed
        start is tried again, up to N times in all (default 3)
    vservers stop [--timeout SECONDS]
        stop every running vserver, higher PRIORITY first, each with its
        STOP_TIMEOUT (or SECONDS)
    vservers restart [--attempts N] [--delay SECONDS] [--timeout SECONDS]
        stop, then start
    vservers status [--json]
        NAME STATE CTX ONBOOT PRIORITY of every vserver

    -v, --verbose   also print what the guests' runlevel scripts say, and each retry

Vservers start and stop one after the other. Exit status 1 if any
vserver failed (a line each on stderr), else 0. The directories come from
VSERVER_CONFDIR, VSERVER_ROOTDIR and VSERVER_RUNDIR (docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from hostagent.paths import Paths

if TYPE_CHECKING:
    from hostagent.onboot import Outcome

# Only argparse and the paths are imported at the top: the library behind the
# verbs (guest.py, cffi, seccomp: about 200 ms) is imported once a verb runs,
# so `vservers --help` and a mistyped verb answer at once.

VERBS = ("start", "stop", "restart", "status")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vservers", add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("verb", nargs="?")
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true")
    return p


def _logging(verbose: bool) -> None:
    import logging

    lib = logging.getLogger("hostagent.onboot")
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vservers: %(message)s"))
        lib.setLevel(logging.INFO)
    else:
        # The outcomes are printed below; without a handler of its own the
        # library's error records would reach stderr a second time.
        handler = logging.NullHandler()
    lib.addHandler(handler)
    lib.propagate = False


class _Printer:
    """Prints each outcome as it comes, and counts the failures."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.failures = 0

    def __call__(self, o: Outcome) -> None:
        if not o.ok:
            self.failures += 1
            tries = f" after {o.attempts} attempts" if o.attempts > 1 else ""
            print(f"vservers: {o.name}: {self.verb} failed{tries}: {o.error}", file=sys.stderr,
                  flush=True)
        elif o.skipped:
            print(f"{o.name}: {o.skipped}", flush=True)
        else:
            done = "started" if self.verb == "start" else "stopped"
            tries = f" (attempt {o.attempts})" if o.attempts > 1 else ""
            print(f"{o.name}: {done}{tries}", flush=True)


def _start(paths: Paths, a: argparse.Namespace) -> int:
    from hostagent import onboot

    printer = _Printer("start")
    onboot.start_onboot(paths, attempts=a.attempts, delay=a.delay, report=printer)
    return printer.failures


def _stop(paths: Paths, a: argparse.Namespace) -> int:
    from hostagent import onboot

    printer = _Printer("stop")
    onboot.stop_all(paths, timeout=a.timeout, report=printer)
    return printer.failures


# --- status -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    state: str  # "running" or "stopped"
    context: int | None
    onboot: bool | None  # None: NAME.conf could not be read (see error)
    priority: int | None
    error: str | None = None

    def cells(self) -> list[str]:
        return [self.name, self.state, "-" if self.context is None else str(self.context),
                "?" if self.onboot is None else ("yes" if self.onboot else "no"),
                "?" if self.priority is None else str(self.priority)]


def rows(paths: Paths) -> list[Row]:
    from hostagent import conf as confmod
    from hostagent import guest

    out = []
    for name in paths.guest_names():
        st = guest.read_state(paths, name)
        up = st is not None and guest.running(paths, name)
        ctx = st.context if st is not None and up else None
        try:
            s = confmod.settings_from_file(paths.conf(name))
        except FileNotFoundError:
            continue  # deleted since the listing
        except (confmod.ConfigError, OSError) as e:
            out.append(Row(name, "running" if up else "stopped", ctx, None, None, str(e)))
            continue
        out.append(Row(name, "running" if up else "stopped", ctx, s.onboot, s.priority))
    return out


def _status(paths: Paths, a: argparse.Namespace) -> int:
    from hostagent.views import print_json, render_table

    table = rows(paths)
    if a.json:
        print_json([asdict(r) for r in table])
    else:
        print("\n".join(render_table(("NAME", "STATE", "CTX", "ONBOOT", "PRIORITY"),
                                     (r.cells() for r in table),
                                     (False, False, True, False, True))))
    broken = [r for r in table if r.error]
    for r in broken:
        print(f"vservers: {r.name}: {r.error}", file=sys.stderr)
    return len(broken)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a, extra = _parser().parse_known_args(args)
    if a.help:
        print(__doc__)
        return 0
    if extra or a.verb not in VERBS:
        what = (f"unknown parameter {' '.join(extra)!r}" if extra else
                f"unknown command {a.verb!r}" if a.verb else "no command given")
        print(f"vservers: {what}; use one of {', '.join(VERBS)} (--help says more)",
              file=sys.stderr)
        return 2
    if a.attempts < 1 or a.delay < 0 or (a.timeout is not None and a.timeout < 0):
        print("vservers: --attempts is at least 1, --delay and --timeout are not negative",
              file=sys.stderr)
        return 2
    _logging(a.verbose)
    paths = Paths.from_env()
    try:
        if a.verb == "status":
            failures = _status(paths, a)
        elif a.verb == "start":
            failures = _start(paths, a)
        elif a.verb == "stop":
            failures = _stop(paths, a)
        else:
            failures = _stop(paths, a) + _start(paths, a)
    except BrokenPipeError:
        from hostagent.views import stdout_closed

        return stdout_closed()
    except OSError as e:
        print(f"vservers: {e}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
