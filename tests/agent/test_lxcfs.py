"""lxcfs: a guest's /proc shows its own memory, CPUs, load and uptime.

Real lxcfs, real guests, as root. The lxcfs the tests use is the host's one
at /var/lib/lxcfs (or VPANEL_LXCFS_DIR), started by scripts/lxcfs.sh if it
is not running and left running afterwards, as `make test` and `make run`
do. Tests that need lxcfs absent or dead point VPANEL_LXCFS_DIR elsewhere,
so the shared instance other test workers rely on is never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostagent import context, guest, lxcfs
from hostagent.cgroup import Cgroup
from hostagent.paths import Paths

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "lxcfs.sh"
V1 = Path("/sys/fs/cgroup")
MIB = 1024 * 1024

# Where the guest sees an lxcfs file instead of the kernel's.
LXCFS_TARGETS = {"/" + rel for rel in lxcfs.FILES}


def run_in(paths: Paths, name: str, script: str, user: str | None = None) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], user=user, output=buf.extend)
    return code, buf.decode(errors="replace")


def out_of(paths: Paths, name: str, script: str) -> str:
    code, out = run_in(paths, name, script)
    assert code == 0, out
    return out


def lxcfs_mounts(mountinfo: str) -> dict[str, str]:
    """Mount point -> per-mount options of every fuse.lxcfs mount in MOUNTINFO."""
    found = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.startswith("fuse.lxcfs "):
            found[fields[4]] = fields[5]
    return found


def meminfo_kb(text: str, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB$", text, re.MULTILINE)
    assert m, text
    return int(m.group(1))


def host_uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def start_lxcfs(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="session")
def lxcfs_running() -> Path:
    """The host's lxcfs mount, started by scripts/lxcfs.sh if need be."""
    if os.geteuid() != 0:
        pytest.fail("lxcfs tests mount FUSE files into guests: run the suite as root")
    if shutil.which("lxcfs") is None:
        pytest.skip("lxcfs is not installed here (scripts/bootstrap.sh installs the Debian "
                    "package 'lxcfs'), so guests cannot get their own /proc files")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("this kernel has no /dev/fuse: lxcfs, a FUSE filesystem, cannot run here")
    res = start_lxcfs()
    assert res.returncode == 0, f"scripts/lxcfs.sh failed:\n{res.stdout}{res.stderr}"
    mount = lxcfs.mountpoint()
    assert mount is not None, lxcfs.probe()[1]
    return mount


@pytest.fixture
def lxcfs_guest(vroots: Paths, busybox_guest: str, lxcfs_running: Path) -> guest.RunState:
    return guest.start(vroots, busybox_guest)


MoveInto = Callable[[str, dict[str, str]], Path]


@pytest.fixture
def v1_cgroups(vroots: Paths, lxcfs_guest: guest.RunState) -> Iterator[MoveInto]:
    """move(controller, {file: value}): a v1 cgroup VSERVER_CGROUP/bb in CONTROLLER's
    hierarchy with those settings, holding every process of the guest.

    The path is the guest's tracking cgroup's, as the limits module uses in
    every hierarchy: lxcfs reads a guest's cpu and cpuacct files at the path
    of its cpuset cgroup, so they have to agree. Everything made is removed
    after the guest is stopped, whoever stopped it.
    """
    made: list[Path] = []

    def move(controller: str, settings: dict[str, str]) -> Path:
        mount = V1 / controller
        if not (mount / "cgroup.procs").exists():
            pytest.skip(f"no cgroup v1 {controller} hierarchy at {mount}")
        d = mount
        for part in lxcfs_guest.cgroup.split("/"):
            d = d / part
            if not d.is_dir():
                d.mkdir()
                made.append(d)
            if controller == "cpuset":
                # A v1 cpuset takes no process until it has CPUs and memory nodes.
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (d / f).read_text().strip():
                        (d / f).write_text((d.parent / f).read_text())
        for f, value in settings.items():
            (d / f).write_text(value)
        for pid in Cgroup(lxcfs_guest.cgroup).procs():
            with contextlib.suppress(ProcessLookupError):
                (d / "cgroup.procs").write_text(str(pid))
        return d

    try:
        yield move
    finally:
        guest.stop(vroots, "bb", timeout=0)
        for d in reversed(made):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


# --- with lxcfs ----------------------------------------------------------------

def test_guest_proc_files_are_lxcfs_read_only_binds(vroots: Paths,
                                                    lxcfs_guest: guest.RunState) -> None:
    mounts = lxcfs_mounts(out_of(vroots, "bb", "cat /proc/self/mountinfo"))
    assert set(mounts) == LXCFS_TARGETS
    for point, opts in mounts.items():
        assert opts.split(",")[0] == "ro", f"{point} is mounted {opts}"
    listing = out_of(vroots, "bb", "mount")
    assert "lxcfs on /proc/meminfo type fuse.lxcfs (ro," in listing
    # Every file reads, as any user (lxcfs mounts with allow_other).
    for user in (None, "guest"):
        code, out = run_in(vroots, "bb", "grep -c . /proc/meminfo /proc/cpuinfo /proc/stat "
                           "/proc/uptime /proc/loadavg /sys/devices/system/cpu/online", user=user)
        assert code == 0, out
        assert all(int(line.rsplit(":", 1)[1]) >= 1 for line in out.splitlines()), out
    # The masks stay on top: lxcfs's slabinfo is not handed in, the kernel's stays hidden.
    if Path("/proc/slabinfo").exists():
        assert out_of(vroots, "bb", "wc -c < /proc/slabinfo").strip() == "0"


def test_guest_uptime_is_its_own(vroots: Paths, lxcfs_guest: guest.RunState) -> None:
    up, idle = (float(x) for x in out_of(vroots, "bb", "cat /proc/uptime").split())
    assert 0 <= up < 60, up
    assert idle >= 0
    host = host_uptime()
    if host > 120:
        assert up < host - 60, (up, host)
    time.sleep(1.1)
    later = float(out_of(vroots, "bb", "cat /proc/uptime").split()[0])
    assert later >= up + 1


def test_loadavg_and_stat_come_from_lxcfs(vroots: Paths, lxcfs_guest: guest.RunState,
                                          v1_cgroups: MoveInto) -> None:
    # A cpuacct cgroup of its own: its CPU time starts from zero, the host's is large.
    v1_cgroups("cpuset", {})
    v1_cgroups("cpuacct", {})
    loadavg = out_of(vroots, "bb", "cat /proc/loadavg").strip()
    assert re.fullmatch(r"\d+\.\d\d \d+\.\d\d \d+\.\d\d \d+/\d+ \d+", loadavg), loadavg
    stat = out_of(vroots, "bb", "cat /proc/stat")
    assert stat.startswith("cpu "), stat
    busy = sum(int(x) for x in stat.splitlines()[0].split()[1:4])
    host_busy = sum(int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:4])
    assert busy < host_busy // 10 + 100, (busy, host_busy)


def test_memory_limit_is_the_guests_memtotal(vroots: Paths, lxcfs_guest: guest.RunState,
                                             v1_cgroups: MoveInto) -> None:
    v1_cgroups("memory", {"memory.limit_in_bytes": str(256 * MIB)})
    meminfo = out_of(vroots, "bb", "cat /proc/meminfo")
    assert meminfo_kb(meminfo, "MemTotal") == 256 * 1024
    assert meminfo_kb(meminfo, "MemFree") <= 256 * 1024
    # busybox top's memory line is /proc/meminfo's: used + free = MemTotal.
    top = out_of(vroots, "bb", "top -bn1")
    m = re.search(r"^Mem: (\d+)K used, (\d+)K free", top, re.MULTILINE)
    assert m, top
    assert int(m.group(1)) + int(m.group(2)) == 256 * 1024
    # busybox free takes its total from sysinfo(2), which lxcfs cannot reach
    # (docs/lxcfs.md); its "available" column is /proc/meminfo's.
    free = out_of(vroots, "bb", "free -m").splitlines()
    header, mem = free[0].split(), free[1].split()
    available = int(mem[1 + header.index("available")])
    assert 0 < available <= 256, free


def test_cpu_quota_is_the_guests_cpu_count(vroots: Paths, lxcfs_guest: guest.RunState,
                                           v1_cgroups: MoveInto) -> None:
    # lxcfs (--enable-cfs) counts quota / period CPUs. It looks the cpu and
    # cpuacct files up at the path of the guest's cpuset cgroup, so the guest
    # needs all three at one path (/proc/stat's per-CPU lines need cpuacct).
    v1_cgroups("cpuset", {})
    v1_cgroups("cpuacct", {})
    v1_cgroups("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"})
    out = out_of(vroots, "bb", "grep -c ^processor /proc/cpuinfo; "
                 "cat /sys/devices/system/cpu/online; grep -c '^cpu[0-9]' /proc/stat")
    assert out.split() == ["1", "0", "1"], out


def test_guest_root_cannot_unmount_or_write_them(vroots: Paths,
                                                 lxcfs_guest: guest.RunState) -> None:
    code, out = run_in(vroots, "bb", "umount /proc/meminfo || umount -l /proc/meminfo")
    assert code != 0 and "Operation not permitted" in out, out
    code, out = run_in(vroots, "bb", "mount -o remount,rw /proc/meminfo")
    assert code != 0, out
    for f in ("/proc/meminfo", "/proc/uptime", "/sys/devices/system/cpu/online"):
        code, out = run_in(vroots, "bb", f"echo 1 > {f}")
        assert code != 0 and "Read-only file system" in out, (f, out)
    mounts = lxcfs_mounts(out_of(vroots, "bb", "cat /proc/self/mountinfo"))
    assert set(mounts) == LXCFS_TARGETS


def test_a_spec_finds_lxcfs_by_default(lxcfs_running: Path) -> None:
    assert context.ContextSpec(root=None).lxcfs == lxcfs_running
    assert context.ContextSpec(root=None, lxcfs=None).lxcfs is None


# --- without lxcfs -------------------------------------------------------------

def test_guest_starts_without_lxcfs_with_the_hosts_files(
        vroots: Paths, busybox_guest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    nowhere = tmp_path / "no-lxcfs"
    nowhere.mkdir()
    monkeypatch.setenv(lxcfs.ENV_DIR, str(nowhere))
    assert lxcfs.probe() == (None, f"{nowhere} is not a mount point, not a fuse.lxcfs mount")
    with caplog.at_level(logging.WARNING, logger="hostagent.lxcfs"):
        guest.start(vroots, busybox_guest)
    assert "lxcfs is not running" in caplog.text
    assert lxcfs_mounts(out_of(vroots, "bb", "cat /proc/self/mountinfo")) == {}
    host_total = meminfo_kb(Path("/proc/meminfo").read_text(), "MemTotal")
    assert meminfo_kb(out_of(vroots, "bb", "cat /proc/meminfo"), "MemTotal") == host_total
    up = float(out_of(vroots, "bb", "cat /proc/uptime").split()[0])
    assert abs(up - host_uptime()) < 30


def test_missing_directory_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lxcfs.ENV_DIR, str(tmp_path / "absent"))
    assert lxcfs.probe() == (None, f"{tmp_path / 'absent'} does not exist")
    assert context.ContextSpec(root=None).lxcfs is None


@pytest.fixture
def own_lxcfs(tmp_path: Path, root_required: None) -> Iterator[dict[str, str]]:
    """The environment for an lxcfs of this test's own, in a temporary directory;
    the one scripts/lxcfs.sh starts there is stopped and unmounted afterwards."""
    if shutil.which("lxcfs") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("lxcfs cannot run here (not installed, or no /dev/fuse)")
    env = {
        "VPANEL_LXCFS_DIR": str(tmp_path / "lxcfs"),
        "VPANEL_LXCFS_PIDFILE": str(tmp_path / "lxcfs.pid"),
        "VPANEL_LXCFS_LOG": str(tmp_path / "lxcfs.log"),
    }
    try:
        yield env
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            stop_process(lxcfs_pid(env))
        # SIGTERM unmounts; a SIGKILLed lxcfs leaves its mount behind.
        if env["VPANEL_LXCFS_DIR"] in lxcfs_mounts(Path("/proc/self/mountinfo").read_text()):
            subprocess.run(["umount", "-l", env["VPANEL_LXCFS_DIR"]], check=False)


def stop_process(pid: int) -> None:
    """SIGTERM PID and wait for it to end (lxcfs takes a few seconds); then SIGKILL."""
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(15_000):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            poller.poll(5_000)
    finally:
        os.close(fd)


def lxcfs_pid(env: dict[str, str]) -> int:
    return int(Path(env["VPANEL_LXCFS_PIDFILE"]).read_text())


def test_script_is_idempotent_and_replaces_a_dead_lxcfs(
        vroots: Paths, busybox_guest: str, own_lxcfs: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    res = start_lxcfs(own_lxcfs)
    assert res.returncode == 0, res.stderr
    first = lxcfs_pid(own_lxcfs)
    res = start_lxcfs(own_lxcfs)
    assert res.returncode == 0, res.stderr
    assert lxcfs_pid(own_lxcfs) == first, "a second lxcfs was started over a live one"
    monkeypatch.setenv(lxcfs.ENV_DIR, own_lxcfs["VPANEL_LXCFS_DIR"])
    assert lxcfs.mountpoint() == Path(own_lxcfs["VPANEL_LXCFS_DIR"])

    # A crashed lxcfs leaves its mount behind, failing every access with ENOTCONN.
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lxcfs.mountpoint() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    mount, why = lxcfs.probe()
    assert mount is None and "lxcfs has died" in why, why
    guest.start(vroots, busybox_guest)
    assert lxcfs_mounts(out_of(vroots, "bb", "cat /proc/self/mountinfo")) == {}
    assert guest.stop(vroots, busybox_guest, timeout=0)

    # The script clears the dead mount and starts a new lxcfs; guests started now get it.
    res = start_lxcfs(own_lxcfs)
    assert res.returncode == 0, res.stderr
    assert "has died" in res.stderr
    assert lxcfs_pid(own_lxcfs) != first
    assert lxcfs.mountpoint() == Path(own_lxcfs["VPANEL_LXCFS_DIR"])
    guest.start(vroots, busybox_guest)
    mounts = lxcfs_mounts(out_of(vroots, "bb", "cat /proc/self/mountinfo"))
    assert set(mounts) == LXCFS_TARGETS
    up = float(out_of(vroots, "bb", "cat /proc/uptime").split()[0])
    assert up < 60
    assert guest.stop(vroots, busybox_guest, timeout=0)

