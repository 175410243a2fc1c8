"""Small static programs that vpanel puts into the guests it builds.

Today one: vreboot (and vhalt, a link to it), the seed's client for the
reboot manager (hostagent/rebootmgr.py). A guest may have no Python and no
libc of the host's version, so it is C, linked static, and compiled on this
host the first time a build needs it: `cc -static -Os -s`, which needs gcc
and libc6-dev (scripts/bootstrap.sh installs both).

The binary is cached under /var/cache/vpanel/guestbin (VPANEL_CACHE_DIR
overrides the first part), named by a hash of the source and the compiler
command, so a changed source is rebuilt and an unchanged one never is. The
cache is written atomically and only trusted if it is ours and nobody else
may write it: every guest built afterwards runs what is in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = ["GuestBinError", "cache_dir", "vreboot_binary", "vreboot_source"]

_SOURCE = Path(__file__).with_name("vreboot.c")
_CFLAGS = ("-static", "-Os", "-s", "-Wall")
_DEFAULT_CACHE = Path("/var/cache/vpanel")


class GuestBinError(RuntimeError):
    """A guest program could not be built; the message says what to install."""


def vreboot_source() -> Path:
    return _SOURCE


def cache_dir() -> Path:
    """Where compiled guest programs are kept: $VPANEL_CACHE_DIR/guestbin."""
    return Path(os.environ.get("VPANEL_CACHE_DIR") or _DEFAULT_CACHE) / "guestbin"


def _compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    raise GuestBinError(
        "cannot build vreboot for guests: no C compiler (cc or gcc) found; "
        "apt-get install gcc libc6-dev")


def _trusted_dir(d: Path) -> None:
    """Make D (and its parent) if missing; refuse one that others could write into."""
    for p in (d.parent, d):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o755)
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode):
            raise GuestBinError(f"{p} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise GuestBinError(f"{p} is writable by others or not ours: refusing to use "
                                "it as the guest program cache")


def _cached_ok(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o022 and st.st_size > 0)


def vreboot_binary() -> Path:
    """The static vreboot for guests, compiled once per source; GuestBinError if it cannot be."""
    cc = _compiler()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join((cc, *_CFLAGS)).encode()).hexdigest()[:16]
    d = cache_dir()
    out = d / f"vreboot-{key}"
    d.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _trusted_dir(d)
    if _cached_ok(out):
        return out
    fd, tmp = tempfile.mkstemp(prefix=".vreboot-", dir=d)
    os.close(fd)
    try:
        try:
            res = subprocess.run([cc, *_CFLAGS, "-o", tmp, str(_SOURCE)], capture_output=True,
                                 text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GuestBinError(f"cannot build vreboot for guests: {cc}: {e}") from e
        if res.returncode != 0:
            err = res.stderr.strip()
            hint = ""
            if "cannot find -lc" in err or ".h: No such file" in err:
                hint = " (the static C library and headers are missing: apt-get install libc6-dev)"
            raise GuestBinError(f"cannot build vreboot for guests{hint}: "
                                f"{cc} exited {res.returncode}: {err[-2000:]}")
        os.chmod(tmp, 0o755)  # noqa: S103 (a program every guest user may run)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out
