"""Every guest at once: the seed's init script (/etc/rc.d/init.d/vservers) as a library.

The seed started the vservers with ONBOOT=yes when the host booted and stopped
them all when it shut down. Here the `vservers` command (cli/vservers.py, run
at boot and shutdown by the vpanel-guests systemd unit in deploy/systemd/)
calls start_onboot() and stop_all(), and the agent daemon start_onboot() when
it starts (unless told --no-onboot, as that unit's agent is).

Order is PRIORITY (NAME.conf, default 100), then the name: lower PRIORITY
first at start, higher first at stop, so a database at PRIORITY 10 is up
before the web guests at 100 that need it and goes down after them. Guests
start (or stop) one after the other, so a PRIORITY group is finished, every
guest up or given up on, before the next begins.

A start that fails is tried again, with a growing pause: boot is when a
network, a mount or a service a NAME.sh hook waits for is most often late.
guest.start() unwinds a failed try completely, so each try begins from nothing.

One guest's failure never stops the others: every guest gets an Outcome,
handed to REPORT as it happens, logged, and returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

from hostagent import conf as confmod
from hostagent import guest
from hostagent.paths import Paths

__all__ = [
    "Outcome",
    "Report",
    "onboot_guests",
    "start_onboot",
    "stop_all",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of one guest: started or stopped (ok), skipped (ok, SKIPPED says
    why), or failed (ERROR is the last try's message). ATTEMPTS counts the tries."""

    name: str
    ok: bool
    attempts: int
    error: str | None = None
    skipped: str | None = None


Report = Callable[[Outcome], None]


# --- which guests, in which order ---------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    settings: confmod.GuestSettings | None
    error: str | None  # why NAME.conf could not be read, when settings is None


def _entries(paths: Paths, names: Iterable[str] | None = None) -> list[_Entry]:
    """Every guest (or NAMES), with its settings or the reason they are missing."""
    out = []
    for name in dict.fromkeys(paths.guest_names() if names is None else names):
        try:
            out.append(_Entry(name, confmod.settings_from_file(paths.conf(name)), None))
        except FileNotFoundError:
            if names is None:
                continue  # deleted since the listing
            out.append(_Entry(name, None, f"{name}: no such vserver ({paths.conf(name)} "
                                          "does not exist)"))
        except (confmod.ConfigError, OSError, ValueError) as e:
            out.append(_Entry(name, None, str(e)))
    return out


def _groups(entries: Iterable[_Entry], *, reverse: bool = False) -> list[list[str]]:
    """Names of ENTRIES (all with settings) by PRIORITY group, in start order or its reverse."""
    prio = {e.name: e.settings.priority for e in entries if e.settings is not None}
    ordered = sorted(prio, key=lambda n: (prio[n], n))
    groups = [list(g) for _, g in groupby(ordered, key=prio.__getitem__)]
    return groups[::-1] if reverse else groups


def onboot_guests(paths: Paths) -> list[str]:
    """The guests with ONBOOT=yes in start order: (PRIORITY, name).

    A NAME.conf that cannot be read is logged and left out: the other guests
    still start.
    """
    entries = _entries(paths)
    for e in entries:
        if e.error is not None:
            log.error("%s: not considered for start at boot: %s", e.name, e.error)
    return [n for g in _groups(e for e in entries if e.settings and e.settings.onboot)
            for n in g]


# --- running the groups -------------------------------------------------------------


def _emit(verb: str, o: Outcome, report: Report | None) -> None:
    if not o.ok:
        log.error("%s: %s failed after %d attempt(s): %s", o.name, verb, o.attempts, o.error)
    elif o.skipped:
        log.info("%s: %s skipped: %s", o.name, verb, o.skipped)
    else:
        log.info("%s: %s done (attempt %d)", o.name, verb, o.attempts)
    if report is not None:
        try:
            report(o)
        except Exception:
            # A report is a side channel (a terminal, an event stream): losing
            # it must not leave the following guests unstarted or unstopped.
            log.exception("%s: reporting the outcome failed", o.name)


def _run_groups(verb: str, groups: Sequence[Sequence[str]], work: Callable[[str], Outcome],
                report: Report | None) -> list[Outcome]:
    """WORK on each name, a group at a time; outcomes in group and name order.

    One guest after the other: a group's order in the log is its order on
    the host, and a hook that waits for an earlier guest finds it up.
    """
    out: list[Outcome] = []
    for group in groups:
        for name in group:
            o = work(name)
            _emit(verb, o, report)
            out.append(o)
    return out


def _failed(entries: Iterable[_Entry], verb: str, report: Report | None,
            why: str = "") -> list[Outcome]:
    out = []
    for e in entries:
        o = Outcome(e.name, False, 0, error=f"{why}{e.error}")
        _emit(verb, o, report)
        out.append(o)
    return out


def _describe(e: Exception) -> str:
    return str(e) if isinstance(e, guest.GuestError) else f"{type(e).__name__}: {e}"


def _logged_output(name: str) -> tuple[guest.Output, Callable[[], None]]:
    """An Output for guest.start/stop that collects what the guest's runlevel
    scripts print, and a flush that logs it a line at a time under NAME."""
    buf = bytearray()

    def flush() -> None:
        for line in buf.decode(errors="replace").splitlines():
            if line.strip():
                log.info("%s: %s", name, line)
        buf.clear()

    return buf.extend, flush


# --- start --------------------------------------------------------------------------


def _start_one(paths: Paths, name: str, attempts: int, delay: float) -> Outcome:
    if guest.running(paths, name):
        return Outcome(name, True, 0, skipped="already running")
    error = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(delay * 2 ** (attempt - 2))
        output, flush = _logged_output(name)
        try:
            guest.start(paths, name, output=output)
        except Exception as e:  # one guest's surprise must not end the boot of the others
            flush()
            if guest.running(paths, name):
                # Another process (the agent and `vservers start` at once, or
                # an admin) started it meanwhile; start() refused, as it should.
                return Outcome(name, True, attempt, skipped="already running")
            error = _describe(e)
            log.warning("%s: start attempt %d of %d failed: %s", name, attempt, attempts,
                        error, exc_info=not isinstance(e, guest.GuestError))
        else:
            flush()
            return Outcome(name, True, attempt)
    return Outcome(name, False, attempts, error=error)


def start_onboot(paths: Paths, *, attempts: int = 3, delay: float = 1.0,
                 report: Report | None = None,
                 names: Sequence[str] | None = None) -> list[Outcome]:
    """Start the ONBOOT=yes guests (or NAMES), lower PRIORITY first.

    Each guest gets up to ATTEMPTS tries, DELAY seconds apart, doubling after
    each further failure (1 s, 2 s, 4 s ...). A guest already running is
    skipped. A NAME.conf that cannot be read fails that guest only, with no
    try. Returns an Outcome per guest, in start order; REPORT gets each one as
    it happens (in this thread).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    if delay < 0:
        raise ValueError(f"delay must not be negative, not {delay}")
    entries = _entries(paths, names)
    wanted = [e for e in entries if e.settings is not None
              and (names is not None or e.settings.onboot)]
    out = _failed((e for e in entries if e.settings is None), "start", report)
    return out + _run_groups("start", _groups(wanted),
                             lambda n: _start_one(paths, n, attempts, delay), report)


# --- stop ---------------------------------------------------------------------------


def _stop_one(paths: Paths, name: str, timeout: float | None) -> Outcome:
    output, flush = _logged_output(name)
    try:
        stopped = guest.stop(paths, name, timeout=timeout, output=output)
    except Exception as e:  # the other guests must still stop
        flush()
        if not isinstance(e, guest.GuestError):
            log.warning("%s: unexpected error while stopping", name, exc_info=True)
        return Outcome(name, False, 1, error=_describe(e))
    flush()
    return Outcome(name, True, 1, skipped=None if stopped else "not running")


def stop_all(paths: Paths, *, timeout: float | None = None,
             report: Report | None = None) -> list[Outcome]:
    """Stop every running guest, higher PRIORITY first (start order reversed).

    Each guest gets its STOP_TIMEOUT, or TIMEOUT if given. A running guest
    whose NAME.conf cannot be read cannot be stopped gracefully (its stop
    settings are unknown) and is reported as failed. Returns an Outcome per
    running guest, in stop order; REPORT gets each one as it happens.
    """
    entries = [e for e in _entries(paths) if guest.running(paths, e.name)]
    out = _failed((e for e in entries if e.settings is None), "stop", report,
                  "its stop settings are unknown: ")
    return out + _run_groups("stop", _groups(entries, reverse=True),
                             lambda n: _stop_one(paths, n, timeout), report)
