"""Guest names: one rule, applied everywhere a name enters the system.

A name becomes a path component under three directories, a cgroup name and
(later) the stem of a host veth name, so it must be short, lower case and
unable to mean anything to a shell or a path walker.
"""

from __future__ import annotations

import argparse
import re

__all__ = ["NAME_RE", "InvalidName", "check_name", "guest_name_arg"]

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}\Z")


class InvalidName(ValueError):
    """A guest name that does not match NAME_RE."""


def check_name(name: object) -> str:
    """Return NAME if it is a valid guest name, else raise InvalidName saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"guest name must be a string, not {type(name).__name__}")
    if not NAME_RE.match(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidName(
            f"invalid guest name {shown!r}: use 1 to 31 characters, a lower-case letter "
            "first, then lower-case letters, digits and '-'"
        )
    return name


def guest_name_arg(text: str) -> str:
    """check_name as an argparse type=: a bad name is a usage error that says why."""
    try:
        return check_name(text)
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None
