"""Where guests live on the host.

Three directories, each overridable by environment so tests and the demo run
in temporary roots and never touch a real /etc/vservers:

  VSERVER_CONFDIR  NAME.conf per guest           (default /etc/vservers)
  VSERVER_ROOTDIR  the guests' root trees        (default /vservers)
  VSERVER_RUNDIR   runtime state, sockets        (default /run/vservers)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hostagent.names import check_name

__all__ = ["Paths"]


@dataclass(frozen=True)
class Paths:
    confdir: Path
    rootdir: Path
    rundir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        e = os.environ if env is None else env
        return cls(
            confdir=Path(e.get("VSERVER_CONFDIR", "/etc/vservers")),
            rootdir=Path(e.get("VSERVER_ROOTDIR", "/vservers")),
            rundir=Path(e.get("VSERVER_RUNDIR", "/run/vservers")),
        )

    def conf(self, name: str) -> Path:
        return self.confdir / f"{check_name(name)}.conf"

    def hooks(self, name: str) -> Path:
        return self.confdir / f"{check_name(name)}.sh"

    def root(self, name: str) -> Path:
        return self.rootdir / check_name(name)

    def state(self, name: str) -> Path:
        """Runtime record of a running guest (context id, init pid, start time)."""
        return self.rundir / f"{check_name(name)}.ctx"

    def lock(self, name: str) -> Path:
        return self.rundir / f"{check_name(name)}.lock"

    def ensure(self) -> None:
        """Create the three directories with their modes.

        The root directory is mode 000, the seed's chroot barrier: a process
        that somehow walks up out of a guest root still cannot list or cross
        into its neighbours. Root passes it through CAP_DAC_OVERRIDE, which
        is why guests also get a pivot_root with the old root detached.
        """
        self.confdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.rootdir.mkdir(mode=0o000, parents=True, exist_ok=True)
        os.chmod(self.rootdir, 0o000)
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Nobody else may list or reach into it; the agent may have let its
        # socket's group search it (0710) to reach agent.sock, which stays.
        os.chmod(self.rundir, 0o700 | (os.stat(self.rundir).st_mode & 0o010))

    def guest_names(self) -> list[str]:
        """Every guest that has a NAME.conf, sorted."""
        if not self.confdir.is_dir():
            return []
        names = []
        for p in self.confdir.glob("*.conf"):
            try:
                names.append(check_name(p.stem))
            except ValueError:
                continue
        return sorted(names)
