"""Every guest at once (hostagent/onboot.py, `vservers`): ONBOOT, PRIORITY, retries and
NAME.sh hooks, with real busybox guests as root.

The hooks below append "$1 $2" to a log on the host, so the log is the order
in which guests started and stopped as their hooks saw it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from hostagent import guest, onboot
from hostagent.cgroup import Cgroup, cgroup_base
from hostagent.paths import Paths
from tests.conftest import mounts_mentioning
from tests.helpers import run

VSERVERS = str(Path(sys.executable).with_name("vservers"))
DELAY = 0.05


def make(paths: Paths, name: str, *, onboot_: bool = True, priority: int | None = None,
         hook: str | None = "") -> None:
    """A busybox guest; HOOK (shell, after the logging line) becomes its NAME.sh, None: none."""
    guest.build(paths, name, guest.BuildOptions(method="busybox", onboot=onboot_))
    if priority is not None:
        guest.set_key(paths, name, "PRIORITY", str(priority))
    if hook is not None:
        write_hook(paths, name, hook)


def write_hook(paths: Paths, name: str, body: str = "", mode: int = 0o755) -> Path:
    script = paths.hooks(name)
    script.write_text(f'#!/bin/sh\necho "$1 $2" >> {shlex.quote(str(hook_log(paths)))}\n'
                      f"{body}\nexit 0\n")
    script.chmod(mode)
    return script


def hook_log(paths: Paths) -> Path:
    return paths.confdir / "hooks.log"


def hook_lines(paths: Paths) -> list[str]:
    log = hook_log(paths)
    return log.read_text().splitlines() if log.exists() else []


def assert_nothing_left(paths: Paths, name: str) -> None:
    cg = Cgroup(f"{cgroup_base()}/{name}")
    assert not cg.exists(), f"cgroup {cg.path} survived"
    assert not paths.state(name).exists(), "the state file survived"
    assert not (paths.rundir / f"{name}.limits").exists()
    assert list((paths.rundir / "contexts").glob("[0-9]*")) == [], "a context is still reserved"
    assert mounts_mentioning(paths.root(name)) == []
    assert not guest.running(paths, name)


# --- start order ----------------------------------------------------------------------


def test_onboot_guests_start_in_priority_order_and_the_others_do_not(vroots: Paths) -> None:
    make(vroots, "late", priority=200)
    make(vroots, "web1")
    make(vroots, "web2")
    make(vroots, "db", priority=10)
    make(vroots, "manual", onboot_=False, priority=5)

    assert onboot.onboot_guests(vroots) == ["db", "web1", "web2", "late"]
    reported: list[onboot.Outcome] = []
    outcomes = onboot.start_onboot(vroots, delay=DELAY, report=reported.append)

    assert [o.name for o in outcomes] == ["db", "web1", "web2", "late"]
    assert all(o.ok and o.attempts == 1 and o.skipped is None for o in outcomes), outcomes
    assert sorted(reported, key=outcomes.index) == outcomes
    assert not guest.running(vroots, "manual")
    assert all(guest.running(vroots, n) for n in ("db", "web1", "web2", "late"))
    lines = hook_lines(vroots)
    assert not [line for line in lines if line.endswith(" manual")]
    # A PRIORITY group is up before the next one begins (web1 and web2 may interleave).
    pos = {line: i for i, line in enumerate(lines)}
    assert pos["post-start db"] < min(pos["pre-start web1"], pos["pre-start web2"])
    assert max(pos["post-start web1"], pos["post-start web2"]) < pos["pre-start late"]


def test_guests_of_equal_priority_start_one_after_the_other(vroots: Paths) -> None:
    # Never two starts at once from threads of one process (onboot._run_groups).
    make(vroots, "pair1")
    make(vroots, "pair2")
    outcomes = onboot.start_onboot(vroots, attempts=1, delay=DELAY)
    assert [(o.name, o.ok) for o in outcomes] == [("pair1", True), ("pair2", True)], outcomes
    lines = hook_lines(vroots)
    pos = {line: i for i, line in enumerate(lines)}
    assert pos["post-start pair1"] < pos["pre-start pair2"], lines


def test_an_already_running_guest_is_skipped(vroots: Paths) -> None:
    make(vroots, "up")
    guest.start(vroots, "up")
    first = guest.read_state(vroots, "up")

    (o,) = onboot.start_onboot(vroots, delay=DELAY)

    assert o == onboot.Outcome("up", True, 0, None, "already running")
    assert guest.read_state(vroots, "up") == first
    assert hook_lines(vroots) == ["pre-start up", "post-start up"]


def test_a_conf_that_does_not_parse_is_reported_and_the_others_start(vroots: Paths) -> None:
    make(vroots, "good")
    make(vroots, "broken")
    conf = vroots.conf("broken")
    conf.write_text(conf.read_text() + 'S_NICE="$(reboot)"\n')

    assert onboot.onboot_guests(vroots) == ["good"]
    outcomes = {o.name: o for o in onboot.start_onboot(vroots, delay=DELAY)}

    assert outcomes["good"].ok and guest.running(vroots, "good")
    bad = outcomes["broken"]
    assert not bad.ok and bad.attempts == 0
    assert bad.error is not None and str(conf) in bad.error and "S_NICE" in bad.error
    assert not guest.running(vroots, "broken")


# --- retries --------------------------------------------------------------------------

FAIL_TWICE = """\
if [ "$1" = pre-start ]; then
  date +%s.%N >> "$(dirname "$0")/$2.tries"
  n=$(wc -l < "$(dirname "$0")/$2.tries")
  [ "$n" -ge 3 ] || { echo "not ready yet ($n)" >&2; exit 1; }
fi"""


def test_a_guest_whose_pre_start_fails_twice_starts_on_the_third_attempt(vroots: Paths) -> None:
    make(vroots, "slow", hook=FAIL_TWICE)

    (o,) = onboot.start_onboot(vroots, attempts=3, delay=DELAY)

    assert o == onboot.Outcome("slow", True, 3, None, None)
    assert guest.running(vroots, "slow")
    assert hook_lines(vroots) == ["pre-start slow"] * 3 + ["post-start slow"]
    # The pause grows: DELAY before the second try, twice that before the third.
    t = [float(x) for x in (vroots.confdir / "slow.tries").read_text().split()]
    assert t[1] - t[0] >= DELAY
    assert t[2] - t[1] >= 2 * DELAY


def test_a_guest_that_always_fails_is_reported_after_all_attempts_and_leaves_nothing(
        vroots: Paths) -> None:
    make(vroots, "doomed", hook='[ "$1" != pre-start ] || { echo "disk not there" >&2; exit 3; }')
    make(vroots, "fine")  # same PRIORITY: one failure does not hold the other back

    outcomes = {o.name: o for o in onboot.start_onboot(vroots, attempts=3, delay=DELAY)}

    o = outcomes["doomed"]
    assert (o.ok, o.attempts, o.skipped) == (False, 3, None)
    assert o.error is not None and "pre-start failed (3)" in o.error
    assert "disk not there" in o.error
    assert [line for line in hook_lines(vroots) if "doomed" in line] == ["pre-start doomed"] * 3
    assert_nothing_left(vroots, "doomed")
    assert outcomes["fine"].ok and guest.running(vroots, "fine")


# --- hooks ----------------------------------------------------------------------------


def test_hooks_run_at_the_four_points_in_order_with_the_point_and_the_name(
        vroots: Paths) -> None:
    make(vroots, "hooked")
    env_dump = vroots.confdir / "hook.env"
    write_hook(vroots, "hooked", f'env > {shlex.quote(str(env_dump))}')

    assert onboot.start_onboot(vroots, delay=DELAY)[0].ok
    assert hook_lines(vroots) == ["pre-start hooked", "post-start hooked"]
    assert [o.name for o in onboot.stop_all(vroots, timeout=1)] == ["hooked"]

    assert hook_lines(vroots) == ["pre-start hooked", "post-start hooked",
                                  "pre-stop hooked", "post-stop hooked"]
    # The hook runs on the host with the caller's environment.
    assert f"VSERVER_ROOTDIR={vroots.rootdir}" in env_dump.read_text().splitlines()


def test_a_failing_pre_start_hook_aborts_the_start_cleanly(vroots: Paths) -> None:
    make(vroots, "nostart", hook='[ "$1" != pre-start ] || { echo "no licence" >&2; exit 1; }')

    with pytest.raises(guest.GuestError, match=r"nostart\.sh pre-start failed \(1\): no licence"):
        guest.start(vroots, "nostart")

    assert hook_lines(vroots) == ["pre-start nostart"]
    assert_nothing_left(vroots, "nostart")
    (o,) = onboot.start_onboot(vroots, attempts=1, delay=DELAY)
    assert not o.ok and o.attempts == 1 and "no licence" in (o.error or "")
    assert_nothing_left(vroots, "nostart")


def test_a_failing_post_start_hook_takes_the_started_guest_down_again(vroots: Paths) -> None:
    make(vroots, "undone", hook='[ "$1" != post-start ] || exit 4')

    with pytest.raises(guest.GuestError, match=r"undone\.sh post-start failed \(4\)"):
        guest.start(vroots, "undone")

    assert hook_lines(vroots) == ["pre-start undone", "post-start undone"]
    assert_nothing_left(vroots, "undone")


def test_a_hook_that_is_not_executable_is_refused_naming_it(vroots: Paths) -> None:
    make(vroots, "noexec", hook=None)
    script = write_hook(vroots, "noexec", mode=0o644)

    (o,) = onboot.start_onboot(vroots, attempts=2, delay=DELAY)

    assert not o.ok and o.attempts == 2
    assert o.error == f"{script} exists but is not executable"
    assert hook_lines(vroots) == []
    assert_nothing_left(vroots, "noexec")


def test_a_hook_the_kernel_cannot_execute_is_refused_naming_it(vroots: Paths) -> None:
    make(vroots, "nosheb", hook=None)
    script = vroots.hooks("nosheb")
    script.write_text("echo no interpreter line\n")
    script.chmod(0o755)

    expected = rf"^{re.escape(str(script))} pre-start could not run: Exec format"
    with pytest.raises(guest.GuestError, match=expected):
        guest.start(vroots, "nosheb")

    assert_nothing_left(vroots, "nosheb")


# --- stop -----------------------------------------------------------------------------


def test_stop_all_stops_every_running_guest_highest_priority_first(vroots: Paths) -> None:
    make(vroots, "first", priority=10)
    make(vroots, "mid1")
    make(vroots, "mid2")
    make(vroots, "last", priority=300, onboot_=False)  # running guests stop, ONBOOT or not
    make(vroots, "idle", priority=400)  # not running: nothing to do
    for name in ("first", "mid1", "mid2", "last"):
        guest.start(vroots, name)
    hook_log(vroots).unlink()
    reported: list[onboot.Outcome] = []

    outcomes = onboot.stop_all(vroots, timeout=1, report=reported.append)

    assert [o.name for o in outcomes] == ["last", "mid1", "mid2", "first"]
    assert all(o.ok and o.attempts == 1 and not o.skipped for o in outcomes), outcomes
    assert sorted(reported, key=outcomes.index) == outcomes
    for name in ("first", "mid1", "mid2", "last"):
        assert_nothing_left(vroots, name)
    lines = hook_lines(vroots)
    pos = {line: i for i, line in enumerate(lines)}
    assert pos["post-stop last"] < min(pos["pre-stop mid1"], pos["pre-stop mid2"])
    assert max(pos["post-stop mid1"], pos["post-stop mid2"]) < pos["pre-stop first"]
    assert not [line for line in lines if "idle" in line]
    assert onboot.stop_all(vroots) == []


def test_stop_all_reports_a_running_guest_whose_conf_broke_and_stops_the_rest(
        vroots: Paths) -> None:
    make(vroots, "keeps")
    make(vroots, "goes")
    guest.start(vroots, "keeps")
    guest.start(vroots, "goes")
    conf = vroots.conf("keeps")
    conf.write_text(conf.read_text() + "PRIORITY=high\n")

    outcomes = {o.name: o for o in onboot.stop_all(vroots, timeout=1)}

    bad = outcomes["keeps"]
    assert not bad.ok and bad.attempts == 0
    assert bad.error is not None and bad.error.startswith("its stop settings are unknown: ")
    assert "PRIORITY" in bad.error
    assert guest.running(vroots, "keeps")
    assert outcomes["goes"].ok
    assert_nothing_left(vroots, "goes")


# --- the vservers command -------------------------------------------------------------


def vservers(*args: str, check_rc: int | None = 0) -> tuple[int, str, str]:
    assert os.access(VSERVERS, os.X_OK), f"{VSERVERS} missing: pip install -e . makes it"
    proc = run([VSERVERS, *args], check_rc=check_rc, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_vservers_start_status_and_stop_through_the_console_script(vroots: Paths) -> None:
    make(vroots, "cli1", priority=20)
    make(vroots, "cli2")
    make(vroots, "cli3", onboot_=False)

    _, out, _ = vservers("status", "--json")
    assert json.loads(out) == [
        {"name": n, "state": "stopped", "context": None, "onboot": ob, "priority": p,
         "error": None}
        for n, ob, p in (("cli1", True, 20), ("cli2", True, 100), ("cli3", False, 100))
    ]

    _, out, _ = vservers("start", "--delay", str(DELAY))
    assert out.splitlines() == ["cli1: started", "cli2: started"]
    assert [guest.running(vroots, n) for n in ("cli1", "cli2", "cli3")] == [True, True, False]

    _, out, _ = vservers("status", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["cli1"]["state"] == "running"
    assert rows["cli1"]["context"] == guest.status(vroots, "cli1").context
    assert rows["cli3"]["state"] == "stopped" and rows["cli3"]["context"] is None
    _, out, _ = vservers("status")
    table = out.splitlines()
    assert table[0].split() == ["NAME", "STATE", "CTX", "ONBOOT", "PRIORITY"]
    assert table[1].split() == ["cli1", "running", str(rows["cli1"]["context"]), "yes", "20"]
    assert table[3].split() == ["cli3", "stopped", "-", "no", "100"]

    _, out, _ = vservers("start", "--delay", str(DELAY))
    assert out.splitlines() == ["cli1: already running", "cli2: already running"]

    _, out, _ = vservers("restart", "--timeout", "1", "--delay", str(DELAY))
    assert out.splitlines() == ["cli2: stopped", "cli1: stopped", "cli1: started", "cli2: started"]

    guest.start(vroots, "cli3")
    _, out, _ = vservers("stop", "--timeout", "1")
    lines = out.splitlines()
    # cli2 and cli3 share PRIORITY 100 and stop together, in either order.
    assert sorted(lines[:2]) == ["cli2: stopped", "cli3: stopped"]
    assert lines[2:] == ["cli1: stopped"]
    for name in ("cli1", "cli2", "cli3"):
        assert_nothing_left(vroots, name)


def test_vservers_start_exits_1_with_a_line_per_failed_guest(vroots: Paths) -> None:
    make(vroots, "ok")
    make(vroots, "bad", hook='[ "$1" != pre-start ] || { echo "no way" >&2; exit 1; }')
    make(vroots, "ugly")
    conf = vroots.conf("ugly")
    conf.write_text(conf.read_text().replace('ONBOOT="yes"', 'ONBOOT="perhaps"'))

    code, out, err = vservers("start", "--attempts", "2", "--delay", str(DELAY), check_rc=1)

    assert code == 1
    assert out.splitlines() == ["ok: started"]
    # (Other lines may be warnings about the host, such as lxcfs not running.)
    failures = [line for line in err.splitlines() if line.startswith("vservers: ")]
    assert len(failures) == 2, err
    assert failures[0].startswith(f"vservers: ugly: start failed: {conf}")
    assert failures[1].startswith("vservers: bad: start failed after 2 attempts: ")
    assert failures[1].endswith("bad.sh pre-start failed (1): no way")
    assert_nothing_left(vroots, "bad")

    code, out, err = vservers("status", check_rc=1)
    assert "ugly" in out and f"vservers: ugly: {conf}" in err


def test_vservers_refuses_unknown_commands(vroots: Paths) -> None:
    _, _, err = vservers("reboot", check_rc=2)
    assert "unknown command 'reboot'" in err
    _, out, _ = vservers("--help")
    assert "vservers start" in out
