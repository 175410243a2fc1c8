"""The seed's global limits on cgroups: the guest tries to take the host, and cannot."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hostagent import guest, limits
from hostagent.cgroup import Cgroup, tracking_hierarchy
from hostagent.conf import GuestConf
from hostagent.paths import Paths


def build(paths: Paths, name: str, flags: tuple[str, ...] = ("lock",), **keys: str) -> None:
    guest.build(paths, name, guest.BuildOptions(method="busybox", flags=list(flags)))
    conf = GuestConf.load(paths.conf(name))
    for k, v in keys.items():
        conf.set(k, v)
    conf.save(paths.conf(name))


def run_in(paths: Paths, name: str, script: str, user: str | None = None) -> tuple[int, str]:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], user=user, output=buf.extend)
    return code, buf.decode(errors="replace")


def cpu_usec(st: guest.RunState) -> int:
    """CPU time of the whole guest so far, from its tracking cgroup's accounting."""
    cg = Cgroup(st.cgroup)
    if cg.hierarchy.version == 2:
        for line in (cg.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    usage = Path("/sys/fs/cgroup/cpuacct") / st.cgroup / "cpuacct.usage"
    return int(usage.read_text()) // 1000


def v1_or_v2(controller: str, relpath: str, v2file: str, v1file: str) -> Path:
    h = limits.controller_hierarchies()[controller]
    return h.mount / relpath / (v2file if h.version == 2 else v1file)


def spin(paths: Paths, name: str, n: int) -> None:
    code, out = run_in(paths, name, f"for i in $(seq 1 {n}); do "
                       "(while :; do :; done) </dev/null >/dev/null 2>&1 & done")
    assert code == 0, out


def share_over(a: guest.RunState, b: guest.RunState, seconds: float = 3.0) -> float:
    """CPU time B got divided by what A got, over SECONDS of both spinning."""
    time.sleep(0.5)  # let the scheduler settle
    a0, b0 = cpu_usec(a), cpu_usec(b)
    time.sleep(seconds)
    a1, b1 = cpu_usec(a), cpu_usec(b)
    return (b1 - b0) / max(1, a1 - a0)


def test_fork_bomb_stops_at_the_guests_limit(vroots: Paths) -> None:
    build(vroots, "bomb", PIDS_MAX="40")
    build(vroots, "calm")
    st = guest.start(vroots, "bomb")
    guest.start(vroots, "calm")
    _code, out = run_in(vroots, "bomb", "b() { b | b & }; b; sleep 2; echo survived")
    assert "can't fork" in out or "Resource temporarily unavailable" in out, out
    pids_max = v1_or_v2("pids", st.cgroup, "pids.max", "pids.max")
    assert pids_max.read_text().strip() == "40"
    assert len(Cgroup(st.cgroup).procs()) <= 40
    # The other guest and the host still fork, and the bomb's guest still stops.
    assert run_in(vroots, "calm", "echo fine")[1] == "fine\n"
    assert os.system("true") == 0  # noqa: S605 - the host forks a shell
    assert guest.stop(vroots, "bomb", timeout=1)
    assert not Cgroup(st.cgroup).exists()


def test_memory_hog_is_killed_inside_its_own_guest(vroots: Paths) -> None:
    build(vroots, "hog", MEMORY_LIMIT="64M")
    st = guest.start(vroots, "hog")
    _code, out = run_in(vroots, "hog", "dd if=/dev/zero of=/dev/null bs=200M count=1; echo rc=$?")
    assert "rc=137" in out or "Killed" in out, out
    small = run_in(vroots, "hog", "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; "
                   "echo rc=$?")[1]
    assert "rc=0" in small
    limit = v1_or_v2("memory", st.cgroup, "memory.max", "memory.limit_in_bytes")
    assert int(limit.read_text()) == 64 << 20
    assert guest.running(vroots, "hog")  # only the hog died, not the guest


def test_cpu_time_splits_by_weight(vroots: Paths) -> None:
    build(vroots, "light", CPU_WEIGHT="100")
    build(vroots, "heavy", CPU_WEIGHT="300")
    a, b = guest.start(vroots, "light"), guest.start(vroots, "heavy")
    cores = os.cpu_count() or 1
    spin(vroots, "light", 2 * cores)
    spin(vroots, "heavy", 2 * cores)
    ratio = share_over(a, b)
    assert 2.0 < ratio < 4.5, f"heavy/light CPU = {ratio:.2f}, weights say 3"


def test_sched_flag_makes_a_guest_weigh_as_one(vroots: Paths) -> None:
    build(vroots, "many", flags=("lock", "sched"))
    build(vroots, "one", flags=("lock", "sched"))
    a, b = guest.start(vroots, "many"), guest.start(vroots, "one")
    spin(vroots, "many", 50)
    spin(vroots, "one", 1)
    cores = os.cpu_count() or 1
    ratio = share_over(b, a)  # many / one
    # Without `sched` 50 spinners would take about 50 times as much as one;
    # as one entity "many" gets at most the CPUs "one" cannot use.
    assert ratio < max(2.0, cores * 1.5), f"many/one CPU = {ratio:.2f}"


def test_memory_limit_changes_on_a_running_guest(vroots: Paths) -> None:
    build(vroots, "live", MEMORY_LIMIT="256M")
    st = guest.start(vroots, "live")
    limit = v1_or_v2("memory", st.cgroup, "memory.max", "memory.limit_in_bytes")
    assert int(limit.read_text()) == 256 << 20
    lines = guest.set_key(vroots, "live", "MEMORY_LIMIT", "96M")
    assert any("MEMORY_LIMIT" in line and "enforced" in line for line in lines), lines
    assert int(limit.read_text()) == 96 << 20
    _code, out = run_in(vroots, "live", "dd if=/dev/zero of=/dev/null bs=150M count=1; echo rc=$?")
    assert "rc=137" in out or "Killed" in out, out
    assert "MEMORY_LIMIT=100663296: enforced" in guest.status(vroots, "live").text()
    # The new value is in NAME.conf, so it survives a restart.
    assert GuestConf.load(vroots.conf("live")).get("MEMORY_LIMIT") == "96M"


def test_a_limit_the_host_cannot_enforce_is_reported(vroots: Paths) -> None:
    build(vroots, "io", IO_WEIGHT="300", PIDS_MAX="100")
    out = bytearray()
    guest.start(vroots, "io", output=out.extend)
    applied = {a.key: a for a in limits.load_applied(vroots.rundir / "io.limits")}
    assert applied["PIDS_MAX"].enforced
    io = applied["IO_WEIGHT"]
    text = guest.status(vroots, "io").text()
    assert f"IO_WEIGHT=300: {'enforced' if io.enforced else 'NOT ENFORCED'}" in text
    if not io.enforced:
        assert b"IO_WEIGHT=300: NOT ENFORCED" in out


def test_bad_limit_values_are_refused_naming_the_key(vroots: Paths) -> None:
    build(vroots, "bad")
    for key, value in (("MEMORY_LIMIT", "lots"), ("CPU_MAX", "-1"), ("PIDS_MAX", "0"),
                       ("CPU_WEIGHT", "20000"), ("NOFILE", "12")):
        with pytest.raises(guest.GuestError, match=key):
            guest.set_key(vroots, "bad", key, value)
    assert not GuestConf.load(vroots.conf("bad")).get("MEMORY_LIMIT")  # unchanged


def test_nproc_flag_turns_ulimit_u_into_a_guest_wide_limit(vroots: Paths) -> None:
    build(vroots, "np", flags=("lock", "nproc"), ULIMIT="-H -u 25")
    st = guest.start(vroots, "np")
    pids_max = v1_or_v2("pids", st.cgroup, "pids.max", "pids.max")
    assert pids_max.read_text().strip() == "25"
    # Shared by every uid in the guest, unlike the per-uid rlimit.
    _code, out = run_in(vroots, "np", "for i in $(seq 1 40); do sleep 3 & done; wait")
    assert "can't fork" in out or "Resource temporarily unavailable" in out, out


def test_nofile_limits_every_guest_process(vroots: Paths) -> None:
    build(vroots, "nf", NOFILE="256")
    guest.start(vroots, "nf")
    assert run_in(vroots, "nf", "ulimit -n; ulimit -H -n")[1].split() == ["256", "256"]
    assert run_in(vroots, "nf", "ulimit -H -n 512 && echo RAISED")[1].find("RAISED") == -1


def test_hideinfo_shows_each_user_only_their_own_processes(vroots: Paths) -> None:
    build(vroots, "hi", flags=("lock", "hideinfo"))
    guest.start(vroots, "hi")
    code, out = run_in(vroots, "hi", "ps -o user,pid,comm", user="guest")
    assert code == 0
    users = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert users == {"guest"}, out
    # Root in the guest still sees the whole guest.
    assert "root" in run_in(vroots, "hi", "ps -o user")[1]


def test_limit_cgroups_go_with_the_guest(vroots: Paths) -> None:
    build(vroots, "gone", MEMORY_LIMIT="128M", CPU_WEIGHT="150", PIDS_MAX="64")
    st = guest.start(vroots, "gone")
    made = [cg.path for cg in limits.GuestCgroups(st.cgroup, limits.ALL_CONTROLLERS)
            .groups.values() if cg.exists()]
    assert made
    guest.stop(vroots, "gone")
    assert [p for p in made if p.exists()] == []
    assert not (vroots.rundir / "gone.limits").exists()
    assert tracking_hierarchy()  # still there for everyone else


def _lxcfs_or_skip() -> None:
    from hostagent import lxcfs

    if lxcfs.mountpoint() is None:
        pytest.skip("lxcfs is not running here (make test starts it with scripts/lxcfs.sh)")


def test_guest_sees_its_memory_limit_and_cpu_quota_as_its_own_machine(vroots: Paths) -> None:
    _lxcfs_or_skip()
    build(vroots, "own", MEMORY_LIMIT="192M", CPU_MAX="1")
    guest.start(vroots, "own")
    code, out = run_in(vroots, "own", "grep MemTotal /proc/meminfo; "
                       "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online")
    assert code == 0
    memtotal, cpus, online = out.splitlines()
    assert memtotal.split()[1] == str(192 * 1024), out  # kB
    assert (cpus, online) == ("1", "0"), out
    # Changing the limit changes what the guest sees, without a restart.
    guest.set_key(vroots, "own", "MEMORY_LIMIT", "96M")
    assert run_in(vroots, "own", "grep MemTotal /proc/meminfo")[1].split()[1] == str(96 * 1024)
