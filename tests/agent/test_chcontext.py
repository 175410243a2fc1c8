"""chcontext: the seed's experiments with security contexts, run through the console script.

The seed ("Playing with /usr/sbin/chcontext"): in one window start a
command; in a second window run `chcontext /bin/sh`. The new shell sees very
little (process 1 and itself), cannot kill the first window's command, and
after it exits the full view is back. Each test here is one of those steps,
plus the flags of reference/vserver.md section 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import caps, guest
from hostagent.cgroup import tracking_hierarchy
from hostagent.contexts import DYNAMIC_CONTEXTS
from hostagent.paths import Paths
from tests.helpers import run

BIN = Path(sys.executable).parent
CHCONTEXT = str(BIN / "chcontext")
NEW_CONTEXT = re.compile(r"^New security context is (\d+)$", re.MULTILINE)
NOBODY = 65534
SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def chcontext(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run([CHCONTEXT, *args], **kw)


def context_number(stdout: str) -> int:
    m = NEW_CONTEXT.search(stdout)
    assert m, f"no 'New security context is N' line in {stdout!r}"
    return int(m.group(1))


def pid_alive(proc: subprocess.Popen[bytes]) -> bool:
    """PROC still runs (poll() reaps it if it died, so a zombie does not count)."""
    return proc.poll() is None


@contextlib.contextmanager
def background(args: list[str], **kw: object) -> Iterator[subprocess.Popen[str]]:
    """A process left running for the length of the block, killed and reaped after it."""
    proc = subprocess.Popen(args, text=True, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def host_sleep() -> Iterator[subprocess.Popen[str]]:
    """The seed's "first window": a command running on the host."""
    with background(["sleep", "300"]) as proc:
        yield proc


def ps_lines(stdout: str) -> list[tuple[int, str]]:
    """(pid, comm) from `ps -e -o pid=,comm=` output."""
    out = []
    for line in stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1].strip()))
    return out


def proc_status_field(stdout: str, field: str) -> str:
    m = re.search(rf"^{field}:\s*(\S+)$", stdout, re.MULTILINE)
    assert m, f"no {field} line in {stdout!r}"
    return m.group(1)


# --- the context number -------------------------------------------------------

def test_chcontext_prints_new_security_context_number(vroots: Paths) -> None:
    out = chcontext("true").stdout
    assert NEW_CONTEXT.fullmatch(out.strip()), out
    assert context_number(out) in DYNAMIC_CONTEXTS
    assert 49152 <= context_number(out) <= 65535

    silent = chcontext("--silent", "true")
    assert silent.stdout == ""
    assert "security context" not in silent.stderr


def test_chcontext_context_number_is_freed_after_exit(vroots: Paths) -> None:
    first = context_number(chcontext("true").stdout)
    second = context_number(chcontext("true").stdout)
    assert first == second == DYNAMIC_CONTEXTS[0]

    # A context still running keeps its number: `read` blocks until we write.
    with background([CHCONTEXT, "sh", "-c", "read x"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=os.environ.copy()) as held:
        assert held.stdout is not None and held.stdin is not None
        held_n = context_number(held.stdout.readline())
        other = context_number(chcontext("true").stdout)
        assert other != held_n
        held.stdin.write("go\n")
        held.stdin.close()
        assert held.wait(timeout=30) == 0
    # ...and gives it back once it is gone.
    assert context_number(chcontext("true").stdout) == held_n == DYNAMIC_CONTEXTS[0]


def test_chcontext_concurrent_runs_get_different_numbers(vroots: Paths) -> None:
    with background([CHCONTEXT, "sleep", "2"], stdout=subprocess.PIPE,
                    env=os.environ.copy()) as bg:
        assert bg.stdout is not None
        n1 = context_number(bg.stdout.readline())
        n2 = context_number(chcontext("true").stdout)
        assert n1 != n2
        assert bg.wait(timeout=30) == 0


# --- the seed's two-window experiment ----------------------------------------

def test_shell_under_chcontext_sees_only_its_own_processes(
        vroots: Paths, host_sleep: subprocess.Popen[str]) -> None:
    ps = "ps" if shutil.which("ps") else "busybox ps"
    out = chcontext(
        "--silent", "sh", "-c",
        f"echo SELF $$; {ps} -e -o pid=,comm=; echo LS; ls /proc",
    ).stdout
    head, _, ls_part = out.partition("LS\n")
    self_pid = int(head.split()[1])
    procs = ps_lines(head.split("\n", 1)[1])
    pids = {pid for pid, _ in procs}
    comms = {comm for _, comm in procs}

    assert 1 in pids, out  # the seed: process 1 is visible from every context
    assert self_pid in pids
    assert host_sleep.pid not in pids
    assert "sleep" not in comms
    # Process 1 (the small init), the shell and ps: nothing of the host.
    assert len(procs) <= 4, procs
    assert comms <= {"sh", "ps", "busybox"} | {c for p, c in procs if p == 1}, procs

    proc_pids = {int(e) for e in ls_part.split() if e.isdigit()}
    assert 1 in proc_pids
    assert str(host_sleep.pid) not in ls_part.split()
    assert len(proc_pids) <= 4, proc_pids
    assert pid_alive(host_sleep)


def test_process_under_chcontext_cannot_kill_outside(
        vroots: Paths, host_sleep: subprocess.Popen[str]) -> None:
    res = chcontext("--silent", "sh", "-c", f"kill -9 {host_sleep.pid}", check_rc=None)
    assert res.returncode != 0, res
    assert "No such process" in res.stderr, res.stderr
    assert pid_alive(host_sleep)


def test_full_view_is_back_after_leaving_the_context(
        vroots: Paths, host_sleep: subprocess.Popen[str]) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    inside = chcontext("--silent", "ls", "/proc").stdout.split()
    assert str(host_sleep.pid) not in inside
    after = Path("/proc/self/mountinfo").read_text()

    assert str(host_sleep.pid) in os.listdir("/proc")
    assert pid_alive(host_sleep)
    assert after == before


# --- names --------------------------------------------------------------------

def test_chcontext_sets_hostname_and_clears_domainname(vroots: Paths) -> None:
    host_name = socket.gethostname()
    # Give the caller a domain name to clear, in a UTS namespace of its own so
    # the host's names are never touched.
    script = (
        'domainname example.org && exec "$@"'
    )
    out = run([
        "unshare", "--uts", "sh", "-c", script, "sh",
        CHCONTEXT, "--silent", "--hostname", "x", "--domainname", "none",
        "sh", "-c",
        "hostname; echo DOMAIN=$(domainname); echo PROC=$(cat /proc/sys/kernel/domainname)",
    ]).stdout
    lines = out.splitlines()
    assert lines[0] == "x", out
    assert "example.org" not in out
    assert lines[1] in ("DOMAIN=", "DOMAIN=(none)"), out
    assert lines[2] in ("PROC=", "PROC=(none)"), out

    assert socket.gethostname() == host_name
    assert run(["hostname"]).stdout.strip() == host_name


def test_chcontext_secure_lowers_the_bounding_set(vroots: Paths, tmp_path: Path) -> None:
    status = "grep -E '^(CapBnd|Seccomp):' /proc/self/status"
    out = chcontext("--silent", "--secure", "sh", "-c", status).stdout
    assert int(proc_status_field(out, "CapBnd"), 16) == caps.to_mask(caps.DEFAULT_CEILING)
    assert proc_status_field(out, "Seccomp") == "2"

    target = tmp_path / "owned"
    target.write_text("x")
    chcontext("--silent", "--secure", "chown", "1", str(target))
    assert target.stat().st_uid == 1
    refused = chcontext("--silent", "--secure", "--cap", "!CAP_CHOWN", "chown", "2", str(target),
                        check_rc=None)
    assert refused.returncode != 0
    assert target.stat().st_uid == 1

    out = chcontext("--silent", "--secure", "--cap", "CAP_NET_RAW", "sh", "-c", status).stdout
    mask = int(proc_status_field(out, "CapBnd"), 16)
    assert mask == caps.to_mask(caps.DEFAULT_CEILING | {caps.CAPS["CAP_NET_RAW"]})


def test_chcontext_exit_status_is_the_commands(vroots: Paths) -> None:
    assert chcontext("--silent", "sh", "-c", "exit 7", check_rc=None).returncode == 7
    assert chcontext("--silent", "true", check_rc=None).returncode == 0


def test_chcontext_with_lock_flag_cannot_unshare(vroots: Paths) -> None:
    # Without the flag root in the context may make namespaces of its own...
    chcontext("--silent", "unshare", "-m", "true")
    # ...with it, no new context can be made from inside.
    res = chcontext("--silent", "--flag", "lock", "unshare", "-m", "true", check_rc=None)
    assert res.returncode != 0
    assert "Operation not permitted" in res.stderr, res.stderr


# --- non-root -----------------------------------------------------------------

def _userns_refusal() -> str | None:
    """Why this host refuses unprivileged user namespaces, or None if it allows them."""
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError) as e:
        return f"cannot read /proc/sys/user/max_user_namespaces: {e}"
    if limit <= 0:
        return f"/proc/sys/user/max_user_namespaces is {limit}"
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if clone.exists() and clone.read_text().strip() != "1":
        return f"/proc/sys/kernel/unprivileged_userns_clone is {clone.read_text().strip()}"
    return None


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by uid 65534 that it can reach (tmp_path's parents are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vpanel-chcontext-"))
    try:
        os.chmod(d, 0o755)  # noqa: S103 - uid 65534 must reach it
        os.chown(d, NOBODY, NOBODY)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_non_root_user_can_run_chcontext(vroots: Paths, nobody_dir: Path) -> None:
    why = _userns_refusal()
    if why is not None:
        pytest.skip(f"unprivileged user namespaces are disabled: {why}")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    env = os.environ.copy()
    env["XDG_RUNTIME_DIR"] = str(nobody_dir)  # its context numbers go here
    # The seed's two windows run as the same user: the host process is nobody's too,
    # so only the context, not the uid, can stop the kill.
    with background([*SETPRIV_NOBODY, "sleep", "300"]) as victim:
        res = run([
            *SETPRIV_NOBODY, CHCONTEXT, "sh", "-c",
            f"echo UID=$(id -u); ps -e -o pid=,comm=; kill -9 {victim.pid}; echo KILL=$?",
        ], env=env, cwd=nobody_dir)
        assert 49152 <= context_number(res.stdout) <= 65535
        assert "UID=65534" in res.stdout.splitlines()
        procs = ps_lines(res.stdout)
        assert 1 in {p for p, _ in procs}
        assert victim.pid not in {p for p, _ in procs}
        assert "sleep" not in {c for _, c in procs}
        assert len(procs) <= 4, procs
        assert "KILL=0" not in res.stdout
        assert "No such process" in res.stderr, res.stderr
        assert pid_alive(victim)
    assert not list((nobody_dir / "vpanel" / "contexts").glob("[0-9]*"))


# --- entering a vserver, cleaning up -----------------------------------------

def test_chcontext_ctx_of_running_vserver_enters_it(vroots: Paths, busybox_guest: str) -> None:
    guest.start(vroots, busybox_guest)
    st = guest.status(vroots, busybox_guest)
    assert st.running and st.context is not None
    res = chcontext("--ctx", str(st.context), "hostname")
    assert res.stdout.strip().splitlines()[-1] == "bb"
    assert socket.gethostname() != "bb"


def test_chcontext_leaves_no_cgroup_behind(vroots: Paths) -> None:
    base = os.environ["VSERVER_CGROUP"]
    mount = tracking_hierarchy().mount
    with background([CHCONTEXT, "sh", "-c", "read x"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=os.environ.copy()) as held:
        assert held.stdout is not None and held.stdin is not None
        n = context_number(held.stdout.readline())
        cg = mount / base / f"ctx-{n}"
        assert cg.is_dir(), f"{cg} does not exist while the context runs"
        # Wait (a bounded number of polls, not a timing check) for the context's processes.
        for _ in range(500):
            if (cg / "cgroup.procs").read_text().split():
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the context's processes never joined {cg}")
        held.stdin.write("go\n")
        held.stdin.close()
        assert held.wait(timeout=30) == 0
    assert not cg.exists()
