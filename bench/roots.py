"""Throwaway VSERVER_* roots for a benchmark, taken down whatever happens."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from hostagent import guest
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths


@contextlib.contextmanager
def bench_roots(prefix: str) -> Iterator[Paths]:
    """Temporary conf, root and run directories and cgroup parent; on exit every
    guest in them is stopped and everything is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f"vpanel-{prefix}-"))
    os.environ.update(
        VSERVER_CONFDIR=str(tmp / "etc"), VSERVER_ROOTDIR=str(tmp / "vservers"),
        VSERVER_RUNDIR=str(tmp / "run"),
        VSERVER_CGROUP=f"vpanel-{prefix}-{uuid.uuid4().hex[:8]}",
    )
    paths = Paths.from_env()
    paths.ensure()
    try:
        yield paths
    finally:
        for name in paths.guest_names():
            with contextlib.suppress(guest.GuestError):
                guest.stop(paths, name, timeout=0)
        cg = Cgroup(os.environ["VSERVER_CGROUP"])
        if cg.exists():
            cg.kill()
            cg.wait_empty(5)
            cg.remove()
        os.chmod(paths.rootdir, 0o700)
        shutil.rmtree(tmp, ignore_errors=True)
