"""The seed's ULIMIT value: arguments to the shell's `ulimit` builtin.

The seed ran `ulimit $ULIMIT` in the start script before exec'ing the guest's
init; here the same text is parsed once and applied with prlimit(2), so no
shell ever sees it. Letters and units follow bash (builtins/ulimit.def) with
one deliberate difference: -H and -S apply to the resource options that
follow them, so `-S -n 1024 -H -n 4096` means soft 1024, hard 4096. Bash
collects -H/-S for the whole command and would set both limits to 1024, then
both to 4096.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["RESOURCES", "RLIMIT_LOCKS", "Limit", "UlimitError", "apply", "parse_ulimit"]

# Python's resource module does not export RLIMIT_LOCKS; it is 10 on every
# architecture (include/uapi/asm-generic/resource.h, which arches only
# override for RSS, NPROC, NOFILE, MEMLOCK and AS).
RLIMIT_LOCKS: int = getattr(resource, "RLIMIT_LOCKS", 10)


class UlimitError(ValueError):
    """A ULIMIT value the parser refuses."""


@dataclass(frozen=True)
class _Resource:
    rlimit: int
    name: str
    # Multiplier from the number written to the rlimit value, as in bash:
    # "kbytes" and 1024-byte blocks are 1024 (bash uses 512 only in POSIX mode).
    factor: int


# Letter -> resource, in bash's order. -R (RLIMIT_RTTIME, microseconds) is in
# bash 5.1+ on Linux and costs nothing to accept.
RESOURCES: dict[str, _Resource] = {
    "c": _Resource(resource.RLIMIT_CORE, "core", 1024),
    "d": _Resource(resource.RLIMIT_DATA, "data", 1024),
    "e": _Resource(resource.RLIMIT_NICE, "nice", 1),
    "f": _Resource(resource.RLIMIT_FSIZE, "fsize", 1024),
    "i": _Resource(resource.RLIMIT_SIGPENDING, "sigpending", 1),
    "l": _Resource(resource.RLIMIT_MEMLOCK, "memlock", 1024),
    "m": _Resource(resource.RLIMIT_RSS, "rss", 1024),
    "n": _Resource(resource.RLIMIT_NOFILE, "nofile", 1),
    "q": _Resource(resource.RLIMIT_MSGQUEUE, "msgqueue", 1),
    "r": _Resource(resource.RLIMIT_RTPRIO, "rtprio", 1),
    "R": _Resource(resource.RLIMIT_RTTIME, "rttime", 1),
    "s": _Resource(resource.RLIMIT_STACK, "stack", 1024),
    "t": _Resource(resource.RLIMIT_CPU, "cpu", 1),
    "u": _Resource(resource.RLIMIT_NPROC, "nproc", 1),
    "v": _Resource(resource.RLIMIT_AS, "as", 1024),
    "x": _Resource(RLIMIT_LOCKS, "locks", 1),
}

_NAMES: dict[int, str] = {r.rlimit: r.name for r in RESOURCES.values()}

# Python's resource module passes limits as signed 64-bit values (and spells
# RLIM_INFINITY as -1), so anything from 2**63 up cannot be set as a number.
_MAX_VALUE = 2**63 - 1

_NUMBER = re.compile(r"[0-9]+\Z")
_NEGATIVE = re.compile(r"-[0-9]+\Z")


@dataclass(frozen=True)
class Limit:
    """One rlimit to set; None leaves that half at its current value."""

    resource: int
    soft: int | None
    hard: int | None

    @property
    def name(self) -> str:
        return _NAMES.get(self.resource, str(self.resource))


def _order(value: int) -> float:
    # RLIM_INFINITY is -1 in Python but the largest limit to the kernel.
    return float("inf") if value == resource.RLIM_INFINITY else float(value)


def _value(option: str, res: _Resource, text: str) -> int:
    if text == "unlimited":
        return resource.RLIM_INFINITY
    if _NEGATIVE.match(text):
        raise UlimitError(f"ulimit -{option}: negative value {text!r}")
    if not _NUMBER.match(text):
        raise UlimitError(
            f"ulimit -{option}: bad value {text!r}: use a whole number or 'unlimited'"
        )
    value = int(text) * res.factor
    if value > _MAX_VALUE:
        raise UlimitError(f"ulimit -{option}: value {text!r} is too large")
    return value


def parse_ulimit(text: str) -> list[Limit]:
    """Limits set by a ULIMIT value such as "-H -u 1000" or "-S -n 1024 -H -n 4096".

    Settings of the same resource combine into one Limit (a later one wins for
    the half it sets), in the order each resource first appears.
    """
    words = text.split()
    soft: dict[int, int] = {}
    hard: dict[int, int] = {}
    order: list[int] = []
    # Which halves the next resource option sets; -H/-S seen since the last
    # resource option accumulate, so "-H -S -n 10" sets both like bash.
    want_soft, want_hard = True, True
    mode_pending = False
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            raise UlimitError(
                f"ulimit: unexpected argument {word!r}: name the resource first, e.g. -n 1024"
            )
        letters = word[1:]
        while letters:
            option, letters = letters[0], letters[1:]
            if option in "HS":
                if not mode_pending:
                    want_soft, want_hard = False, False
                    mode_pending = True
                if option == "H":
                    want_hard = True
                else:
                    want_soft = True
                continue
            res = RESOURCES.get(option)
            if res is None:
                known = " ".join("-" + k for k in RESOURCES)
                raise UlimitError(f"ulimit: unknown option -{option} (known: -H -S {known})")
            if letters:
                # "-n1024", as getopt allows.
                arg, letters = letters, ""
            elif i < len(words) and (not words[i].startswith("-") or _NEGATIVE.match(words[i])):
                arg = words[i]
                i += 1
            else:
                raise UlimitError(f"ulimit -{option}: missing value")
            value = _value(option, res, arg)
            if res.rlimit not in order:
                order.append(res.rlimit)
            if want_soft:
                soft[res.rlimit] = value
            if want_hard:
                hard[res.rlimit] = value
            mode_pending = False
    if mode_pending:
        raise UlimitError("ulimit: -H or -S at the end applies to no resource")
    limits = []
    for rlimit in order:
        lim = Limit(rlimit, soft.get(rlimit), hard.get(rlimit))
        if lim.soft is not None and lim.hard is not None and _order(lim.soft) > _order(lim.hard):
            raise UlimitError(
                f"ulimit: {lim.name} soft limit {_shown(lim.soft)} is above "
                f"its hard limit {_shown(lim.hard)}"
            )
        limits.append(lim)
    return limits


def _shown(value: int | None) -> str:
    if value is None:
        return "unchanged"
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def apply(limits: Iterable[Limit], pid: int = 0) -> None:
    """Set LIMITS on process PID (0: this process) with prlimit(2).

    A half left as None keeps its current value; a soft limit above the hard
    one is lowered to it, since the kernel refuses soft > hard with EINVAL and
    "-H -n 256" on its own should just work.
    """
    for lim in limits:
        soft, hard = lim.soft, lim.hard
        try:
            cur_soft, cur_hard = resource.prlimit(pid, lim.resource)
            hard = cur_hard if hard is None else hard
            soft = cur_soft if soft is None else soft
            if _order(soft) > _order(hard):
                soft = hard
            resource.prlimit(pid, lim.resource, (soft, hard))
        except (OSError, ValueError) as e:
            e.add_note(
                f"setting {lim.name} to soft {_shown(soft)}, hard {_shown(hard)} on pid {pid}"
            )
            raise
