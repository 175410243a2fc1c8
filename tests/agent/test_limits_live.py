"""`vserver NAME set` on a running guest: limits go up, come down and are lifted at once.

The cgroup files themselves are the truth, read after each change; what
`set` and `status` print must agree with them. One test runs the limits code
against a pretend cgroup v2 tree, since this project's hosts keep memory,
pids and cpu on v1 and the v2 file names would otherwise go untested.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostagent import guest, limits
from hostagent.cgroup import Cgroup, Hierarchy
from hostagent.conf import GuestConf
from hostagent.paths import Paths

VSERVER = [sys.executable, "-m", "hostagent.cli.vserver"]


def build(paths: Paths, name: str, **keys: str) -> None:
    guest.build(paths, name, guest.BuildOptions(method="busybox", flags=["lock"]))
    conf = GuestConf.load(paths.conf(name))
    for k, v in keys.items():
        conf.set(k, v)
    conf.save(paths.conf(name))


def cgroup_file(controller: str, relpath: str, v2file: str, v1file: str) -> Path:
    h = limits.controller_hierarchies()[controller]
    return h.mount / relpath / (v2file if h.version == 2 else v1file)


def unlimited(path: Path) -> bool:
    """"max" on v2; on v1 -1 reads back as the largest page-aligned number."""
    text = path.read_text().split()[0]
    return text in ("max", "-1") or int(text) >= 1 << 62


def test_lifting_the_last_cpu_limit_of_a_running_guest_lifts_it(vroots: Paths) -> None:
    build(vroots, "cpu", CPU_MAX="0.5", CPU_WEIGHT="300")
    st = guest.start(vroots, "cpu")
    quota = cgroup_file("cpu", st.cgroup, "cpu.max", "cpu.cfs_quota_us")
    weight = cgroup_file("cpu", st.cgroup, "cpu.weight", "cpu.shares")
    assert quota.read_text().split()[0] == "50000"
    guest.set_key(vroots, "cpu", "CPU_WEIGHT", "")
    assert weight.read_text().strip() in ("100", "1024")  # v2 default, v1 default
    assert quota.read_text().split()[0] == "50000"  # the other key still holds
    # CPU_MAX is now the last key that asked for the cpu controller: the
    # guest is still in the cgroup that holds the quota, and it must go.
    lines = guest.set_key(vroots, "cpu", "CPU_MAX", "")
    assert unlimited(quota), lines
    assert any(line.startswith("CPU_MAX=: enforced") for line in lines), lines
    code = guest.exec_in(vroots, "cpu", ["/bin/true"], output=bytearray().extend)
    assert code == 0


def test_memory_and_swap_limits_can_be_raised_and_lifted_on_a_running_guest(
        vroots: Paths) -> None:
    build(vroots, "mem", MEMORY_LIMIT="64M", SWAP_LIMIT="32M")
    st = guest.start(vroots, "mem")
    v2 = limits.controller_hierarchies()["memory"].version == 2
    mem = cgroup_file("memory", st.cgroup, "memory.max", "memory.limit_in_bytes")
    swap = cgroup_file("memory", st.cgroup, "memory.swap.max", "memory.memsw.limit_in_bytes")
    if not swap.exists():
        pytest.skip(f"{swap.name} missing: the kernel accounts no swap here")
    assert int(mem.read_text()) == 64 << 20
    # Up: on v1 memory may never exceed memory+swap, so the order of the
    # writes decides whether the kernel takes them (EINVAL otherwise).
    lines = guest.set_key(vroots, "mem", "MEMORY_LIMIT", "128M")
    assert not [line for line in lines if "NOT ENFORCED" in line], lines
    assert int(mem.read_text()) == 128 << 20
    assert int(swap.read_text()) == (32 << 20 if v2 else 160 << 20)
    # Down again.
    guest.set_key(vroots, "mem", "MEMORY_LIMIT", "48M")
    assert int(mem.read_text()) == 48 << 20
    # Lifted: nothing may still hold the guest at the old value.
    lines = guest.set_key(vroots, "mem", "MEMORY_LIMIT", "")
    assert unlimited(mem), lines
    assert "MEMORY_LIMIT=: enforced" in guest.status(vroots, "mem").text()
    guest.set_key(vroots, "mem", "SWAP_LIMIT", "")
    assert unlimited(swap)


def nofile_of(pid: int) -> tuple[str, str]:
    """(soft, hard) "Max open files" of PID, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24
    return False


def run_in(paths: Paths, name: str, script: str) -> str:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], output=buf.extend)
    assert code == 0, buf.decode(errors="replace")
    return buf.decode(errors="replace")


def test_nofile_reaches_running_processes_and_new_execs_at_once(vroots: Paths) -> None:
    build(vroots, "fd", NOFILE="4096")
    st = guest.start(vroots, "fd")
    # A process that was running before the change, detached from the exec.
    run_in(vroots, "fd", "setsid sleep 600 </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 30
    while True:  # the background child may not have exec'd sleep yet
        sleepers = [pid for pid in Cgroup(st.cgroup).procs() if comm(pid) == "sleep"]
        if sleepers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(sleepers) == 1
    assert nofile_of(sleepers[0]) == ("4096", "4096")
    lines = guest.set_key(vroots, "fd", "NOFILE", "2048")
    assert len(lines) == 1 and lines[0].startswith("NOFILE=2048: enforced"), lines
    assert nofile_of(sleepers[0]) == ("2048", "2048")
    assert nofile_of(st.init_pid) == ("2048", "2048")
    assert run_in(vroots, "fd", "ulimit -n").strip() == "2048"
    assert "NOFILE=2048: enforced" in guest.status(vroots, "fd").text()
    # Another key's change keeps NOFILE's line in status.
    guest.set_key(vroots, "fd", "MEMORY_LIMIT", "200M")
    assert "NOFILE=2048: enforced" in guest.status(vroots, "fd").text()
    # Raising a hard limit needs CAP_SYS_RESOURCE, which some hosts deny even
    # to root: then the running processes keep theirs and `set` says so.
    lines = guest.set_key(vroots, "fd", "NOFILE", "3000")
    assert run_in(vroots, "fd", "ulimit -n").strip() == "3000"
    if has_cap_sys_resource():
        assert lines[0].startswith("NOFILE=3000: enforced"), lines
        assert nofile_of(sleepers[0]) == ("3000", "3000")
    else:
        assert "NOT ENFORCED" in lines[0] and "CAP_SYS_RESOURCE" in lines[0], lines
        assert nofile_of(sleepers[0]) == ("2048", "2048")


def test_dropping_nproc_lifts_the_guest_wide_process_limit(vroots: Paths) -> None:
    build(vroots, "np", S_FLAGS="lock nproc", ULIMIT="-u 100", PIDS_MAX="50")
    st = guest.start(vroots, "np")
    pids_max = cgroup_file("pids", st.cgroup, "pids.max", "pids.max")
    assert pids_max.read_text().strip() == "50"
    # PIDS_MAX emptied: nproc's limit (ULIMIT -u) is what is left, not none.
    guest.set_key(vroots, "np", "PIDS_MAX", "")
    assert pids_max.read_text().strip() == "100"
    lines = guest.set_key(vroots, "np", "S_FLAGS", "lock")
    assert pids_max.read_text().strip() == "max", lines
    assert any(line.startswith("PIDS_MAX=: enforced") for line in lines), lines
    # A flag change that lifts nothing says nothing about limits it never had.
    lines = guest.set_key(vroots, "np", "S_FLAGS", "lock private")
    assert not [line for line in lines if line.startswith("PIDS_MAX=")], lines


def test_dropping_sched_lifts_the_cpu_weight(vroots: Paths) -> None:
    build(vroots, "sc", S_FLAGS="lock sched", CPU_WEIGHT="300")
    st = guest.start(vroots, "sc")
    weight = cgroup_file("cpu", st.cgroup, "cpu.weight", "cpu.shares")
    assert weight.read_text().strip() in ("300", "3072")
    # With CPU_WEIGHT still set, dropping sched leaves the weight alone.
    guest.set_key(vroots, "sc", "S_FLAGS", "lock")
    assert weight.read_text().strip() in ("300", "3072")
    guest.set_key(vroots, "sc", "S_FLAGS", "lock sched")
    # NAME.conf edited by hand while the guest runs, as the seed allows:
    # CPU_WEIGHT is gone, the cgroup still holds 300, and sched goes next.
    conf = GuestConf.load(vroots.conf("sc"))
    conf.unset("CPU_WEIGHT")
    conf.save(vroots.conf("sc"))
    lines = guest.set_key(vroots, "sc", "S_FLAGS", "lock")
    assert weight.read_text().strip() in ("100", "1024"), lines  # v2 default, v1 default
    assert any(line.startswith("CPU_WEIGHT=: enforced") for line in lines), lines


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VSERVER, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)


def test_vserver_set_applies_at_once_and_refuses_a_bad_value(vroots: Paths) -> None:
    build(vroots, "cli", MEMORY_LIMIT="256M")
    st = guest.start(vroots, "cli")
    limit = cgroup_file("memory", st.cgroup, "memory.max", "memory.limit_in_bytes")
    res = cli("cli", "set", "MEMORY_LIMIT", "96M")
    assert res.returncode == 0, res.stderr
    assert f"MEMORY_LIMIT={96 << 20}: enforced" in res.stdout
    assert int(limit.read_text()) == 96 << 20
    bad = cli("cli", "set", "MEMORY_LIMIT", "lots")
    assert bad.returncode == 1 and "MEMORY_LIMIT" in bad.stderr, bad
    assert int(limit.read_text()) == 96 << 20
    assert GuestConf.load(vroots.conf("cli")).get("MEMORY_LIMIT") == "96M"
    usage = cli("cli", "set", "MEMORY_LIMIT")
    assert usage.returncode == 1 and "usage" in usage.stderr
    # A key only a start can apply is saved and says so.
    later = cli("cli", "set", "S_HOSTNAME", "other")
    assert later.returncode == 0 and "next start" in later.stdout


@pytest.fixture
def v2_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pretend pure cgroup v2 host: a directory with every controller enabled."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    h = Hierarchy(tmp_path, 2)
    monkeypatch.setattr(limits, "tracking_hierarchy", lambda: h)
    monkeypatch.setattr(limits, "cgroup_mounts", lambda: [(str(tmp_path), "cgroup2", "rw")])
    return tmp_path


def test_a_v2_host_gets_every_limit_in_its_v2_file(v2_host: Path) -> None:
    lim = limits.Limits(memory=64 << 20, swap=32 << 20, cpu_weight=300, cpu_max=1.5, pids=50,
                        io_weight=200)
    gcg = limits.GuestCgroups("vpanel/g", lim.controllers())
    assert {n: cg.hierarchy.version for n, cg in gcg.groups.items()} == {
        "memory": 2, "pids": 2, "cpu": 2, "io": 2}
    gcg.create()
    applied = gcg.apply(lim)
    assert [a for a in applied if not a.enforced] == []
    d = v2_host / "vpanel/g"
    assert {f: (d / f).read_text() for f in ("memory.max", "memory.swap.max", "cpu.weight",
                                              "cpu.max", "pids.max", "io.weight")} == {
        "memory.max": str(64 << 20), "memory.swap.max": str(32 << 20), "cpu.weight": "300",
        "cpu.max": "150000 100000", "pids.max": "50", "io.weight": "200"}
    # Each controller is handed down to the guest's parent.
    assert (v2_host / "vpanel/cgroup.subtree_control").read_text().startswith("+")
    # Processes are cloned straight into the v2 cgroup: nothing else to join.
    assert gcg.join_files() == ()
    # Lifting works even when nothing in NAME.conf asks for the controller any more.
    bare = limits.GuestCgroups("vpanel/g", {"memory", "pids"})
    assert bare.clear("CPU_MAX").enforced
    assert (d / "cpu.max").read_text() == "max 100000"
    assert bare.clear("MEMORY_LIMIT").enforced
    assert (d / "memory.max").read_text() == "max"
