"""Capability options shared by chcontext and reducecap."""

from __future__ import annotations

from collections.abc import Iterable

from hostagent import caps as capmod

__all__ = ["apply_cap_words"]


def apply_cap_words(start: frozenset[int], words: Iterable[str], *, secure: bool) -> frozenset[int]:
    """START, minus the --secure set if asked, then each CAP (add) or !CAP (remove) word.

    Adding back is limited to what the caller still has: a bounding set can
    only shrink, so asking for more than START is an error, said plainly.
    """
    caps = set(start)
    if secure:
        caps -= capmod.SECURE_DROP
    for word in words:
        if word.startswith("!"):
            caps.discard(capmod.cap_number(word[1:]))
            continue
        n = capmod.cap_number(word)
        if n not in start:
            raise capmod.CapabilityError(
                f"{capmod.cap_name(n)} is not in this process's bounding set; it cannot be added"
            )
        caps.add(n)
    return frozenset(caps)
