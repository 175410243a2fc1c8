"""Module-scoped guests for the security tests.

Building and starting a busybox guest costs about a second, and most probes
only need one running guest to attack, so each test module shares its guests
through the `lab` fixture instead of `vroots` (which is per test). `lab` makes
the same promises as `vroots`: temporary VSERVER_* roots, a private cgroup
parent, and on the way out every guest stopped and deleted, the cgroup parent
killed and removed, and the root directory's mode put back to 0755.

Deleting the guests matters more here than in other suites: some tests plant
setuid-root and file-capability binaries in a guest root, and those must not
outlive the module in a world-traversable /tmp.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import guest
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths


class Lab:
    """The guests of one test module, built and started on first use."""

    def __init__(self, paths: Paths, cgroup_parent: str) -> None:
        self.paths = paths
        self.cgroup_parent = cgroup_parent
        self._started: set[str] = set()

    def guest(self, name: str, **opts: Any) -> str:
        """Build and start NAME once per module; OPTS are guest.BuildOptions fields."""
        if name not in self._started:
            guest.build(self.paths, name, guest.BuildOptions(method="busybox", **opts))
            guest.start(self.paths, name)
            self._started.add(name)
        return name

    def root(self, name: str) -> Path:
        return self.paths.root(name)

    def state(self, name: str) -> guest.RunState:
        st = guest.read_state(self.paths, name)
        assert st is not None, f"{name} has no runtime state"
        return st

    def init_pid(self, name: str) -> int:
        return self.state(name).init_pid

    def host_pids(self, name: str) -> list[int]:
        """Host pids of every process of the guest (its cgroup)."""
        return Cgroup(self.state(name).cgroup).procs()

    def run(self, name: str, script: str, *, user: str | None = None) -> tuple[int, str]:
        """Run SCRIPT with /bin/sh inside NAME; return (exit status, stdout+stderr)."""
        buf = bytearray()
        code = guest.exec_in(self.paths, name, ["/bin/sh", "-c", script], user=user,
                             output=buf.extend)
        return code, buf.decode(errors="replace")

    def teardown(self) -> None:
        for name in self.paths.guest_names():
            try:
                guest.stop(self.paths, name, timeout=0)
            except Exception:  # teardown must go on
                st = guest.read_state(self.paths, name)
                if st is not None:
                    cg = Cgroup(st.cgroup)
                    cg.kill()
                    cg.wait_empty(5)
        parent = Cgroup(self.cgroup_parent)
        if parent.exists():
            parent.kill()
            parent.wait_empty(5)
            parent.remove()
        for name in self.paths.guest_names():
            with contextlib.suppress(Exception):
                guest.delete(self.paths, name)
        # The root directory is mode 000 (the seed's barrier); let tmp_path go.
        if self.paths.rootdir.exists():
            os.chmod(self.paths.rootdir, 0o755)  # noqa: S103 (tmp dir, guests deleted)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Temporary VSERVER_* roots and cgroup parent shared by one test module."""
    if os.geteuid() != 0:
        pytest.fail("this test creates namespaces, mounts and cgroups: run the suite as root")
    base = tmp_path_factory.mktemp("sec")
    cgroup_parent = f"vpanel-sec-{uuid.uuid4().hex[:12]}"
    env = {
        "VSERVER_CONFDIR": str(base / "etc"),
        "VSERVER_ROOTDIR": str(base / "vservers"),
        "VSERVER_RUNDIR": str(base / "run"),
        "VSERVER_CGROUP": cgroup_parent,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        paths = Paths.from_env()
        paths.ensure()
        lab_ = Lab(paths, cgroup_parent)
        try:
            yield lab_
        finally:
            lab_.teardown()
