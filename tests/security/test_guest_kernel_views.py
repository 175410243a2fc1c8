"""The guest's /proc and /sys: the parts that stay readable are not writable.

The foundation issue asks for /proc/sys, /proc/sysrq-trigger, /proc/bus,
/proc/fs and /proc/irq read-only and sysfs read-only (moby's ReadonlyPaths).
test_guest_escape.py tries individual knobs; here every one of those mounts
is checked in the guest's own mount table, and a write is tried where it is
harmless even if it went through (the value the file already holds).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conftest import Lab

READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq", "/sys")


def mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point -> per-mount options of the uppermost mount there, as PID sees them."""
    out: dict[str, set[str]] = {}
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            out[fields[4].replace("\\040", " ")] = set(fields[5].split(","))
    return out


def test_proc_parts_and_sysfs_are_mounted_read_only(lab: Lab) -> None:
    name = lab.guest("ro")
    opts = mount_options(lab.init_pid(name))
    present = [p for p in READ_ONLY if os.path.exists(p)]
    assert "/proc/sys" in present and "/sys" in present
    not_ro = {p: sorted(opts.get(p, {"(no mount)"})) for p in present
              if "ro" not in opts.get(p, set())}
    assert not_ro == {}
    # The rest of /proc is still a live, writable proc (a guest's own
    # /proc/self/... entries), so read-only is per part, not wholesale.
    assert "rw" in opts["/proc"]


def test_guest_root_cannot_write_back_what_an_irq_file_holds(lab: Lab) -> None:
    knob = "/proc/irq/default_smp_affinity"
    if not os.path.exists(knob):
        pytest.skip(f"{knob} does not exist on this kernel")
    name = lab.guest("ro")
    code, out = lab.run(name, f"""
        v=$(cat {knob}) && echo read=ok
        if echo "$v" > {knob}; then echo WROTE; else echo refused; fi
    """)
    assert code == 0, out
    assert "read=ok" in out  # readable, as the issue asks
    assert "WROTE" not in out and "refused" in out, out
    assert "Read-only file system" in out, out
