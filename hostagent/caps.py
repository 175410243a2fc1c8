"""Linux capabilities by kernel name and number, and a guest's capability ceiling.

The ceiling is the bounding set a guest runs with (PR_CAPBSET_DROP for every
capability outside it), the modern form of the seed's `chcontext --secure`
plus S_CAPS. Names are the kernel's (`CAP_NET_RAW`), so they can be looked up
in capabilities(7) and include/uapi/linux/capability.h.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CAPS",
    "DEFAULT_CEILING",
    "SECURE_DROP",
    "SEED_SECURE_DROP",
    "UNSAFE",
    "CapabilityError",
    "bounding_drop",
    "cap_name",
    "cap_number",
    "ceiling",
    "from_mask",
    "last_cap",
    "names",
    "to_mask",
]


class CapabilityError(ValueError):
    """An unknown capability, or one the ceiling refuses to grant."""


# Numbers from include/uapi/linux/capability.h (Linux 5.9+, where
# CAP_CHECKPOINT_RESTORE became the last one). They are ABI and never change;
# a newer kernel only appends, which last_cap() reports.
CAPS: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

_BY_NUMBER: dict[int, str] = {n: name for name, n in CAPS.items()}

# Capability sets are 64-bit in the kernel (struct kernel_cap_struct since
# Linux 6.3, two u32 words before), so no mask bit above 63 can mean anything.
_MASK_BITS = 64

_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


def cap_number(name: str) -> int:
    """Number of a capability given as "CAP_NET_RAW", "NET_RAW" or "net_raw"."""
    key = name.upper()
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    try:
        return CAPS[key]
    except KeyError:
        raise CapabilityError(f"unknown capability {name!r}") from None


def cap_name(n: int) -> str:
    """Kernel name ("CAP_NET_RAW") of capability number N."""
    try:
        return _BY_NUMBER[n]
    except KeyError:
        raise CapabilityError(f"unknown capability number {n!r}") from None


def last_cap(path: Path = _CAP_LAST_CAP) -> int:
    """Highest capability number the running kernel knows.

    Older kernels lack the file (it appeared in 3.2) and a kernel newer than
    this table may know more caps than CAPS lists; the file is the truth when
    it can be read, the table otherwise.
    """
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return max(CAPS.values())


def _caps(*names_: str) -> frozenset[int]:
    return frozenset(CAPS["CAP_" + n] for n in names_)


# Docker's default set (moby daemon/pkg/oci/caps/defaults.go) minus CAP_MKNOD
# (device nodes are only safe behind a device filter) and CAP_NET_RAW (ping works
# through net.ipv4.ping_group_range instead; raw sockets allow spoofing on
# the guest's link). See reference security.md section 2.
DEFAULT_CEILING: frozenset[int] = _caps(
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
)

# Granting these through S_CAPS needs an explicit override: each one alone
# lets guest root reach the host kernel or the host's files.
UNSAFE: dict[int, str] = {
    CAPS["CAP_SYS_ADMIN"]: "mount, namespaces, most of the kernel",
    CAPS["CAP_SYS_MODULE"]: "load kernel code",
    CAPS["CAP_SYS_RAWIO"]: "raw device and port I/O",
    CAPS["CAP_DAC_READ_SEARCH"]: (
        'open_by_handle_at "shocker" escape to host files (CVE-2014-9357)'
    ),
    CAPS["CAP_BPF"]: "load programs into the kernel",
}

# What the seed's 0.x `chcontext --secure` dropped (util-vserver da691fd4,
# src/chcontext.c). Kept for reference and tests only: it leaves
# DAC_READ_SEARCH, SYS_PTRACE, SYS_TTY_CONFIG and LEASE in place, which was
# safe only on the VServer kernel patch.
SEED_SECURE_DROP: frozenset[int] = _caps(
    "LINUX_IMMUTABLE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "MKNOD",
)

# What `chcontext --secure` / `reducecap --secure` drop here: every known
# capability outside DEFAULT_CEILING, so --secure leaves exactly the default
# ceiling. That is the seed's list plus DAC_READ_SEARCH (shocker), SYS_PTRACE,
# SYS_TTY_CONFIG, LEASE and every capability numbered 29 or more except
# AUDIT_WRITE and SETFCAP (the seed predates them).
SECURE_DROP: frozenset[int] = frozenset(CAPS.values()) - DEFAULT_CEILING


def bounding_drop(keep: Iterable[int], last: int | None = None) -> frozenset[int]:
    """Every capability the running kernel knows (0..last_cap()) outside KEEP.

    Dropping by the kernel's count rather than by CAPS means a capability added
    by a kernel newer than this table is dropped too, never silently kept.
    """
    top = last_cap() if last is None else last
    return frozenset(range(top + 1)) - frozenset(keep)


def _spec_words(spec: Iterable[str]) -> list[str]:
    # A bare string is an S_CAPS value, not an iterable of one-letter items.
    if isinstance(spec, str):
        return spec.split()
    return [word for item in spec for word in item.split()]


def ceiling(
    spec: Iterable[str],
    *,
    allow_unsafe: bool = False,
    base: frozenset[int] = DEFAULT_CEILING,
) -> frozenset[int]:
    """BASE with the S_CAPS words of SPEC applied in order.

    "CAP_NET_RAW" adds a capability, "!CAP_SYS_CHROOT" removes one (the seed's
    syntax). Adding one of UNSAFE is refused unless ALLOW_UNSAFE.
    """
    caps = set(base)
    for word in _spec_words(spec):
        if word.startswith("!"):
            caps.discard(cap_number(word[1:]))
            continue
        n = cap_number(word)
        if n in UNSAFE and not allow_unsafe:
            raise CapabilityError(
                f"{cap_name(n)} is refused: {UNSAFE[n]}. To grant it anyway set "
                f'S_CAPS_UNSAFE="yes" in the guest\'s conf (or pass --allow-unsafe-caps)'
            )
        caps.add(n)
    return frozenset(caps)


def to_mask(caps: Iterable[int]) -> int:
    """Kernel bit mask (as in /proc/PID/status CapBnd) of the capability numbers."""
    mask = 0
    for n in caps:
        if not 0 <= n < _MASK_BITS:
            raise CapabilityError(f"capability number {n!r} is out of range 0..63")
        mask |= 1 << n
    return mask


def from_mask(mask: int) -> frozenset[int]:
    """Capability numbers set in MASK, including ones newer than CAPS."""
    if not 0 <= mask < 1 << _MASK_BITS:
        raise CapabilityError(f"capability mask {mask:#x} is not a 64-bit value")
    return frozenset(n for n in range(_MASK_BITS) if mask >> n & 1)


def names(caps: Iterable[int]) -> list[str]:
    """Kernel names of CAPS, sorted by capability number.

    A number this table does not know (a kernel newer than it) is shown as the
    bare number, as libcap's cap_to_name() does, so listing a real bounding
    set never fails.
    """
    return [_BY_NUMBER.get(n, str(n)) for n in sorted(set(caps))]
