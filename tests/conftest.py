"""Fixtures shared by the whole suite.

Agent tests run as root against the real kernel, each in its own temporary
VSERVER_* roots and its own cgroup parent, and take down everything they
made even when they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import guest, syscalls
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths
from tests.helpers import stop_all


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Every test starts with an empty Django cache: the API's rate counters
    (panel/hosting/api/throttles.py) outlive a test's database rollback, and
    users of later tests get the same ids."""
    from django.core.cache import caches

    caches["default"].clear()


@pytest.fixture
def root_required() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test creates namespaces, mounts and cgroups: run the suite as root")


@pytest.fixture
def vroots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_required: None) -> Iterator[Paths]:
    """Temporary VSERVER_CONFDIR/ROOTDIR/RUNDIR and a private cgroup parent."""
    base = tmp_path / "v"
    env = {
        "VSERVER_CONFDIR": str(base / "etc"),
        "VSERVER_ROOTDIR": str(base / "vservers"),
        "VSERVER_RUNDIR": str(base / "run"),
        "VSERVER_CGROUP": f"vpanel-test-{uuid.uuid4().hex[:12]}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    paths = Paths.from_env()
    paths.ensure()
    try:
        yield paths
    finally:
        stop_all(paths)
        parent = Cgroup(env["VSERVER_CGROUP"])
        if parent.exists():
            parent.kill()
            parent.wait_empty(5)
            parent.remove()
        # Unified guests keep their merged tree mounted on the host.
        for point in sorted(mounts_under(base), key=len, reverse=True):
            syscalls.umount2(point, syscalls.MNT_DETACH)
        # The root directory is mode 000 (the seed's barrier); let tmp_path go.
        os.chmod(paths.rootdir, 0o700)


@pytest.fixture
def busybox_guest(vroots: Paths) -> Iterator[str]:
    """A built (not started) busybox guest named 'bb'."""
    guest.build(vroots, "bb", guest.BuildOptions(method="busybox"))
    yield "bb"


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below PATH in this mount namespace."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                points.append(point)
    return points


def mounts_mentioning(path: Path) -> list[str]:
    """Every process whose mount table still holds PATH (a guest root): none should."""
    needle = f" {path} "
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as f:
                if needle in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found
