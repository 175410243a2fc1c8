"""The seed's context-1 tools: vps, vpstree, vtop, vkill, vserver-stat, and usage_all.

Real guests on the real kernel, as root. The truth each tool is checked
against is the guest's own cgroup (Cgroup(st.cgroup).procs()) and its
accounting files, never the tool's own helpers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostagent import guest, usage
from hostagent.cgroup import Cgroup
from hostagent.cli import vkill, vps, vserver_stat
from hostagent.limits import controller_hierarchies
from hostagent.paths import Paths
from hostagent.views import ContextMap, host_pid_in, nspid, start_of
from tests.helpers import run

BIN = Path(sys.executable).parent


def tool(name: str, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / name), *args], check_rc=check_rc)


def run_in(paths: Paths, name: str, script: str) -> str:
    buf = bytearray()
    code = guest.exec_in(paths, name, ["/bin/sh", "-c", script], output=buf.extend)
    assert code == 0, buf.decode(errors="replace")
    return buf.decode(errors="replace")


def start_guest(paths: Paths, name: str, flags: tuple[str, ...] = ()) -> guest.RunState:
    guest.build(paths, name, guest.BuildOptions(method="busybox", flags=flags))
    return guest.start(paths, name)


def start_sleep(paths: Paths, name: str) -> int:
    """A `sleep 300` in guest NAME; its pid as the guest sees it."""
    return int(run_in(paths, name, "sleep 300 >/dev/null 2>&1 </dev/null & echo $!").split()[-1])


def host_pid(st: guest.RunState, inner: int) -> int | None:
    level = len(nspid(st.init_pid) or ()) - 1
    return host_pid_in(Cgroup(st.cgroup).procs(), level, inner)


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def two(vroots: Paths) -> dict[str, guest.RunState]:
    return {name: start_guest(vroots, name) for name in ("web", "db")}


# --- vps ---------------------------------------------------------------------------

def _vps_rows(out: str) -> dict[int, tuple[str, str]]:
    """pid -> (context, name) from `vps` output whose first two columns are PID CONTEXT."""
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["PID", "CONTEXT"], lines[0]
    rows = {}
    for line in lines[1:]:
        f = line.split()
        rows[int(f[0])] = (f[1], f[2] if f[1] != "-" else "-")
    return rows


def test_vps_names_every_guest_process_and_no_other(vroots: Paths,
                                                    two: dict[str, guest.RunState]) -> None:
    procs = {name: set(Cgroup(st.cgroup).procs()) for name, st in two.items()}
    rows = _vps_rows(tool("vps", "ax").stdout)
    for name, st in two.items():
        assert procs[name], name
        shown = {pid for pid, (_ctx, n) in rows.items() if n == name}
        assert shown == procs[name], (name, shown, procs[name])
        for pid in procs[name]:
            assert rows[pid] == (str(st.context), name)
    guest_pids = procs["web"] | procs["db"]
    for pid, (ctx, name) in rows.items():
        if pid not in guest_pids:
            assert name in ("MAIN", "-"), (pid, ctx, name)
            assert ctx in ("0", "-")


def test_vps_finds_the_pid_column_wherever_ps_puts_it(vroots: Paths,
                                                      two: dict[str, guest.RunState]) -> None:
    st = two["web"]
    web = set(Cgroup(st.cgroup).procs())
    for args in (["-ef"], ["aux"], ["-eo", "comm,user,pid"], ["-e", "-o", "pid,args"]):
        out = tool("vps", *args).stdout
        header = out.splitlines()[0].split()
        assert header[header.index("PID") + 1] == "CONTEXT", (args, header)
        hits = set()
        for line in out.splitlines()[1:]:
            m = re.search(rf"\b(\d+) {st.context} +web\b", line)
            if m:
                hits.add(int(m.group(1)))
        assert hits == web, (args, out)


def test_vps_json(vroots: Paths, two: dict[str, guest.RunState]) -> None:
    records = json.loads(tool("vps", "--json").stdout)
    assert {"pid", "context", "guest", "user", "cpu", "mem", "command"} <= set(records[0])
    for name, st in two.items():
        mine = [r for r in records if r["guest"] == name]
        assert {r["pid"] for r in mine} == set(Cgroup(st.cgroup).procs())
        assert {r["context"] for r in mine} == {st.context}
        assert any("syslogd" in r["command"] for r in mine)
    me = next(r for r in records if r["command"].startswith(str(BIN / "vps")) or
              "vps --json" in r["command"])
    assert (me["context"], me["guest"]) == (0, None)


def test_vps_shows_a_chcontext_context_by_number(vroots: Paths, tmp_path: Path) -> None:
    # The context keeps chcontext's stdout: a file, so that nobody waits for its EOF.
    # A sleep of a length no other test uses: tests running beside this one sleep too.
    out_file = tmp_path / "chcontext.out"
    length = "60.0133"
    with out_file.open("w") as f:
        subprocess.run([str(BIN / "chcontext"), "--disconnect", "sleep", length], stdout=f,
                       stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True,
                       timeout=60)
    m = re.search(r"New security context is (\d+)", out_file.read_text())
    assert m, out_file.read_text()
    n = int(m.group(1))
    out = tool("vps", "-eo", "pid,args").stdout
    line = next(x for x in out.splitlines() if x.endswith(f"sleep {length}"))
    os.kill(int(line.split()[0]), signal.SIGKILL)
    assert line.split()[1:3] == [str(n), "UNKNOWN"], line


def test_vps_annotate_without_a_pid_column_is_refused(vroots: Paths) -> None:
    res = tool("vps", "-eo", "comm", check_rc=1)
    assert "PID column" in res.stderr


def test_pid_column_found_when_a_wide_column_pushes_it(vroots: Paths) -> None:
    ctxmap = ContextMap(vroots, states={})
    out = "USER         PID COMMAND\naverylongusername 1 init\nroot           1 init\n"
    text = vps.annotate(out, ctxmap)
    assert text is not None
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["USER", "PID", "CONTEXT"]
    assert lines[1].split()[:4] == ["averylongusername", "1", "0", "MAIN"]
    assert lines[2].split()[:4] == ["root", "1", "0", "MAIN"]


# --- vkill -------------------------------------------------------------------------

def test_vkill_hits_the_in_guest_pid(vroots: Paths, busybox_guest: str) -> None:
    st = guest.start(vroots, busybox_guest)
    first, second = start_sleep(vroots, "bb"), start_sleep(vroots, "bb")
    host_first, host_second = host_pid(st, first), host_pid(st, second)
    assert host_first and host_second and host_first != first
    tool("vkill", "--guest", "bb", str(first))
    assert wait_gone(host_first)
    assert start_of(host_second) is not None, "the other sleep was hit"
    # The in-guest pid again: it is gone now.
    res = tool("vkill", "--guest", "bb", str(first), check_rc=1)
    assert "no such process in vserver bb" in res.stderr
    # --ctx N means the same, and kill(1)'s -SIG form works.
    tool("vkill", "--ctx", str(st.context), "-KILL", str(second))
    assert wait_gone(host_second)
    assert guest.running(vroots, "bb")


def test_vkill_by_host_pid_and_zero_signal(vroots: Paths, busybox_guest: str) -> None:
    st = guest.start(vroots, busybox_guest)
    hp = host_pid(st, start_sleep(vroots, "bb"))
    assert hp is not None
    tool("vkill", "-s", "0", str(hp))
    assert start_of(hp) is not None
    res = tool("vkill", "--ctx", "0", str(hp), check_rc=1)
    assert "not in context 0" in res.stderr
    tool("vkill", str(hp))
    assert wait_gone(hp)
    assert tool("vkill", "-s", "NOSUCH", "1", check_rc=1).stderr.strip() \
        == "vkill: unknown signal NOSUCH"


def test_vkill_refuses_a_private_guest(vroots: Paths) -> None:
    st = start_guest(vroots, "priv", flags=("private", "lock"))
    res = tool("vkill", "--guest", "priv", "1", check_rc=1)
    assert "'private' flag" in res.stderr
    res = tool("vkill", "-KILL", str(st.init_pid), check_rc=1)
    assert "'private' flag" in res.stderr
    others = [p for p in Cgroup(st.cgroup).procs() if p != st.init_pid]
    res = tool("vkill", "-KILL", *map(str, others), check_rc=1)
    assert res.stderr.count("'private' flag") == len(others)
    time.sleep(0.1)
    assert guest.running(vroots, "priv")
    assert sorted(Cgroup(st.cgroup).procs()) == sorted([st.init_pid, *others])


def test_vkill_signal_names() -> None:
    assert vkill.parse_signal("9") == 9
    assert vkill.parse_signal("term") == vkill.parse_signal("SIGTERM") == 15
    assert vkill.parse_signal("0") == 0
    with pytest.raises(ValueError):
        vkill.parse_signal("99")


# --- vserver-stat ------------------------------------------------------------------

def _cpu_stat(st: guest.RunState) -> dict[str, int]:
    text = (Cgroup(st.cgroup).path / "cpu.stat").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def test_vserver_stat_rows_match_the_cgroups(vroots: Paths,
                                             two: dict[str, guest.RunState]) -> None:
    conf = vroots.conf("web")
    conf.write_text(re.sub(r'DESCRIPTION="[^"]*"', 'DESCRIPTION="the web server"',
                           conf.read_text()))
    before = {n: _cpu_stat(st) for n, st in two.items()}
    rows = json.loads(tool("vserver-stat", "--json").stdout)
    after = {n: _cpu_stat(st) for n, st in two.items()}
    assert [r["name"] for r in rows] == sorted(two, key=lambda n: two[n].context)
    for r in rows:
        st = two[r["name"]]
        assert r["context"] == st.context
        assert r["processes"] == len(Cgroup(st.cgroup).procs())
        for key, col in (("user_usec", "user_seconds"), ("system_usec", "system_seconds")):
            assert before[r["name"]][key] / 1e6 <= r[col] <= after[r["name"]][key] / 1e6
        assert r["rss"] > 0 and r["vsz"] >= r["rss"]
        assert 0 <= r["uptime"] < 600
    assert next(r for r in rows if r["name"] == "web")["description"] == "the web server"

    text = tool("vserver-stat").stdout.splitlines()
    assert text[0].split() == ["CTX", "PROC", "VSZ", "RSS", "userTIME", "sysTIME", "UPTIME",
                               "NAME", "DESCRIPTION"]
    for line in text[1:]:
        f = line.split()
        st = two[f[7]]
        assert (int(f[0]), int(f[1])) == (st.context, len(Cgroup(st.cgroup).procs()))
        assert re.fullmatch(r"\d+m\d\d\.\d\d", f[6]), f[6]
    assert text[1 + [r["name"] for r in rows].index("web")].endswith(" web      the web server")


def test_vserver_stat_formats() -> None:
    ft, fm = vserver_stat.format_time, vserver_stat.format_mem
    assert ft(1.52) == "0m01.52"
    assert ft(3723) == "1h02m03"
    assert ft(2 * 86400 + 3 * 3600 + 4 * 60) == "2d03h04"
    assert ft(None) == "-"
    assert [fm(1023), fm(12 * 1024 + 5), fm(5 << 20), fm(3 << 40)] == ["1023B", "12kB", "5MB",
                                                                        "3TB"]


def test_vserver_stat_without_guests(vroots: Paths) -> None:
    assert tool("vserver-stat").stdout.split() == ["CTX", "PROC", "VSZ", "RSS", "userTIME",
                                                   "sysTIME", "UPTIME", "NAME", "DESCRIPTION"]
    assert json.loads(tool("vserver-stat", "--json").stdout) == []


# --- vtop, vpstree -----------------------------------------------------------------

def test_vtop_once_shows_the_guests_processes(vroots: Paths,
                                              two: dict[str, guest.RunState]) -> None:
    lines = tool("vtop", "--once", "-d", "0.2").stdout.splitlines()
    assert lines[1].split() == ["PID", "USER", "CTX", "NAME", "%CPU", "%MEM", "RSS", "COMMAND"]
    rows = {int(f[0]): f for f in (line.split() for line in lines[2:])}
    for name, st in two.items():
        for pid in Cgroup(st.cgroup).procs():
            assert rows[pid][2:4] == [str(st.context), name], rows[pid]
    cpu = [float(f[4]) for f in rows.values()]
    assert cpu == sorted(cpu, reverse=True)

    only = json.loads(tool("vtop", "--once", "--json", "-d", "0.1", "--guest", "db").stdout)
    assert {r["pid"] for r in only} == set(Cgroup(two["db"].cgroup).procs())
    assert {(r["context"], r["guest"]) for r in only} == {(two["db"].context, "db")}
    assert 1 in {r["guest_pid"] for r in only}
    assert tool("vtop", "--once", "--guest", "nope", check_rc=1).stderr.strip() \
        == "vtop: vserver nope is not running"


def test_guest_cannot_forge_a_row_in_host_tools(vroots: Paths,
                                                two: dict[str, guest.RunState]) -> None:
    # argv and comm are the guest's to choose; a newline in them shows as '?'.
    run_in(vroots, "web", "sh -c 'sleep 300; :' \"$(printf 'x\\n1 root 0 host init')\" "
                          ">/dev/null 2>&1 </dev/null &")
    out = tool("vtop", "--once", "-d", "0.1").stdout
    assert "x?1 root 0 host init" in out
    assert all(line.split()[0].isdigit() for line in out.splitlines()[2:])
    tree = tool("vpstree", "-a", "--guest", "web").stdout
    assert "x?1 root" in tree and "\n1 root" not in tree


def test_vpstree_annotates_each_process(vroots: Paths, two: dict[str, guest.RunState]) -> None:
    st = two["web"]
    text = tool("vpstree", "--guest", "web").stdout.splitlines()
    assert text[0].endswith(f"({st.init_pid}) [{st.context} web]")
    assert len(text) == len(Cgroup(st.cgroup).procs())
    assert all(line.endswith(f"[{st.context} web]") for line in text)
    (root,) = json.loads(tool("vpstree", "--json", "--guest", "web").stdout)
    assert (root["pid"], root["guest_pid"], root["guest"]) == (st.init_pid, 1, "web")
    assert {c["comm"] for c in root["children"]} >= {"syslogd", "httpd"}
    whole = tool("vpstree").stdout
    for name, s in two.items():
        for pid in Cgroup(s.cgroup).procs():
            assert f"({pid}) [{s.context} {name}]" in whole


# --- usage -------------------------------------------------------------------------

def test_usage_all_covers_running_guests(vroots: Paths, two: dict[str, guest.RunState]) -> None:
    guest.build(vroots, "idle", guest.BuildOptions(method="busybox"))  # built, not started
    all_usage = usage.usage_all(vroots)
    assert set(all_usage) == {"web", "db"}
    for name, u in all_usage.items():
        st = two[name]
        assert (u.context, u.cgroup) == (st.context, st.cgroup)
        assert u.processes == len(Cgroup(st.cgroup).procs()) > 0
        assert u.cpu_seconds is not None and u.cpu_seconds >= 0
        assert u.cpu_user_seconds is not None and u.cpu_system_seconds is not None
        if "memory" in controller_hierarchies():
            # The limits module puts every guest in a memory cgroup.
            assert u.memory_current is not None and u.memory_current > 0
            assert u.memory_peak is not None and u.memory_peak >= u.memory_current
        # No addresses: no veth, so no counters to show.
        assert (u.net_rx_bytes, u.net_tx_bytes) == (None, None)
        # No qgroup or image here: what vdu counts of its root, busybox and all.
        assert u.disk_used is not None and u.disk_used > 1 << 20
        assert u.uptime >= 0
    guest.stop(vroots, "db", timeout=0)
    assert set(usage.usage_all(vroots)) == {"web"}
    assert usage.usage_of(vroots, "db") is None
