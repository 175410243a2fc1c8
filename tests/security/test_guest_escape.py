"""Guest root is hostile: it tries to break out, and the host stays as it was.

reference/security.md, "Guest escape & host tampering" (GE*) and
"Cross-guest interference" (XG*). Every probe runs as root (or a user) inside
a running busybox guest through guest.exec_in, exactly as an attacker with a
shell in the guest would; the host's side is read before and after. Each
negative check has a positive twin nearby (the same tool working on the host,
or the guest doing what its ceiling allows), so a probe that fails for a
boring reason (missing applet, typo) cannot pass as a defence.

A weakness found here is fixed in hostagent/ with its test turned green;
none is left as an expected failure.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shlex
import socket
import stat
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hostagent import caps, guest

if TYPE_CHECKING:
    from .conftest import Lab

# Guests also hold CAP_SYS_BOOT: in their own PID namespace, with kexec refused by
# seccomp, reboot(2) can only end the guest (hostagent/rebootmgr.py sys_boot_allowed).
CEILING_MASK = caps.to_mask(caps.DEFAULT_CEILING | {caps.CAPS["CAP_SYS_BOOT"]})
SYS_ADMIN = caps.CAPS["CAP_SYS_ADMIN"]

# What /dev holds in every guest (hostagent/context.py _setup_dev).
DOCUMENTED_DEV = {"null", "zero", "full", "random", "urandom", "tty", "console", "ptmx",
                  "pts", "shm", "fd", "stdin", "stdout", "stderr",
                  "reboot", ".rebootmgr"}  # the reboot manager's socket (docs/rebootmgr.md)
# Character devices behind those names, as (major, minor): the host's nodes.
DEV_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
               "urandom": (1, 9), "tty": (5, 0), "console": (1, 3)}


# --- helpers -------------------------------------------------------------------

def status_fields(text: str) -> dict[str, str]:
    """The "Key:\\tvalue" lines of a /proc/PID/status dump."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and " " not in key:
            out[key] = value.strip()
    return out


def host_read(path: str) -> bytes | None:
    """Content of a host file, or None when it does not exist or cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def guest_mount_ids(init_pid: int) -> set[int]:
    with open(f"/proc/{init_pid}/mountinfo", encoding="utf-8") as f:
        return {int(line.split()[0]) for line in f}


def fd_mnt_id(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise AssertionError(f"no mnt_id in /proc/{pid}/fdinfo/{fd}")


def fds_outside_guest(pid: int, mount_ids: set[int]) -> list[str]:
    """Descriptors of host PID naming a file that is not on one of the guest's mounts.

    Pipes, sockets and anonymous inodes name no path. /dev/null is the one
    host node the agent may hand over as stdin: a character device cannot be
    walked out of. Any other path must live on a mount of the guest's own
    mount namespace; readlink alone cannot tell, since a host file and a
    guest file can have the same path, so the mount id decides.
    """
    bad = []
    fddir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fddir)
    except FileNotFoundError:
        return bad
    for fd in fds:
        try:
            target = os.readlink(f"{fddir}/{fd}")
            if not target.startswith("/"):
                continue  # pipe:[..], socket:[..], anon_inode:[..]
            st = os.stat(f"{fddir}/{fd}")
            if (target == "/dev/null" and stat.S_ISCHR(st.st_mode)
                    and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)):
                continue
            if fd_mnt_id(pid, fd) not in mount_ids:
                bad.append(f"pid {pid} fd {fd} -> {target}")
        except FileNotFoundError:
            continue  # the process or descriptor went away meanwhile
    return bad


def guest_pids(lab: Lab, name: str) -> list[str]:
    """Guest-side pids (last NSpid) of the guest's long-lived processes, read from the host."""
    out = []
    for pid in lab.host_pids(name):
        text = host_read(f"/proc/{pid}/status")
        if text is None:
            continue
        nspid = status_fields(text.decode()).get("NSpid", "").split()
        if len(nspid) >= 2:
            out.append(nspid[-1])
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def host_sleep() -> Iterator[subprocess.Popen[bytes]]:
    """A host process no guest may see or signal (its own session, so kill -1 tests are safe)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def bb(lab: Lab) -> str:
    """The module's default guest: busybox, default ceiling, S_FLAGS="lock"."""
    return lab.guest("bb")


# --- GE1: what a guest process starts with ----------------------------------------

def test_guest_status_shows_ceiling_seccomp(lab: Lab, bb: str) -> None:
    code, out = lab.run(bb, "cat /proc/self/status")
    assert code == 0, out
    st = status_fields(out)
    assert int(st["CapBnd"], 16) == CEILING_MASK
    # Guest root holds its whole ceiling, and nothing can be passed on around it.
    assert int(st["CapEff"], 16) == CEILING_MASK
    assert int(st["CapPrm"], 16) == CEILING_MASK
    assert int(st["CapInh"], 16) == 0
    assert int(st["CapAmb"], 16) == 0
    assert st["Seccomp"] == "2"

    # The guest's PID 1, read from the host, is held to the same ceiling.
    with open(f"/proc/{lab.init_pid(bb)}/status", encoding="utf-8") as f:
        init = status_fields(f.read())
    assert int(init["CapBnd"], 16) == CEILING_MASK
    assert int(init["CapEff"], 16) & ~CEILING_MASK == 0
    assert int(init["CapInh"], 16) == 0 and int(init["CapAmb"], 16) == 0
    assert init["Seccomp"] == "2"

    # An unprivileged guest user has no capabilities at all.
    code, out = lab.run(bb, "cat /proc/self/status", user="guest")
    assert code == 0, out
    user = status_fields(out)
    assert user["Uid"].split()[0] == "1000"
    assert int(user["CapEff"], 16) == 0 and int(user["CapPrm"], 16) == 0
    assert int(user["CapBnd"], 16) == CEILING_MASK

    # Positive twin: the host side of this very test runs with more than the ceiling.
    with open("/proc/self/status", encoding="utf-8") as f:
        me = status_fields(f.read())
    assert int(me["CapEff"], 16) & ~CEILING_MASK


def test_guest_root_can_use_what_its_ceiling_grants(lab: Lab, bb: str) -> None:
    """Positive baseline for the probes below: the guest is root within its ceiling."""
    code, out = lab.run(bb, """
        set -e
        touch /tmp/mine && chown 1000:1000 /tmp/mine && chmod 4700 /tmp/mine   # CHOWN, FSETID
        stat -c '%u:%g %a' /tmp/mine
        sleep 60 & kill -9 $! && wait $! || echo killed=$?                     # KILL
        mkdir -p /tmp/cr/bin && cp /bin/busybox /tmp/cr/bin/ && chroot /tmp/cr /bin/busybox true
        echo chroot=ok                                                          # SYS_CHROOT
        su guest -c 'id -u'                                                     # SETUID
        rm -rf /tmp/mine /tmp/cr
    """)
    assert code == 0, out
    assert "1000:1000 4700" in out
    assert "killed=137" in out
    assert "chroot=ok" in out
    assert out.strip().endswith("1000")


# --- XG1 and host processes ------------------------------------------------------

def test_guest_cannot_see_host_processes(lab: Lab, bb: str,
                                         host_sleep: subprocess.Popen[bytes]) -> None:
    hostpid = host_sleep.pid
    before = guest_pids(lab, bb)
    code, out = lab.run(bb, f"""
        sleep 123 & echo own=$!
        echo pids: $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' ')
        ps -o pid,args
        cat /proc/{hostpid}/cmdline 2>/dev/null | tr '\\0' ' ' | sed 's/^/hostpid-cmdline: /'
        echo; readlink /proc/1/exe
    """)
    assert code == 0, out
    pids = set(re.search(r"^pids: (.*)$", out, re.M).group(1).split())  # type: ignore[union-attr]
    own = re.search(r"^own=(\d+)$", out, re.M).group(1)  # type: ignore[union-attr]
    # Positive: the guest sees its own new process, in ps and in /proc.
    assert own in pids
    assert re.search(rf"^\s*{own}\s+sleep 123", out, re.M), out
    # The host's process is nowhere: not by pid, not by command line.
    assert str(hostpid) not in pids
    assert "sleep 300" not in out
    assert "hostpid-cmdline: sleep" not in out
    # The guest's pid 1 is its own init, not the host's.
    assert "memfd:vpanel-init" in out
    # Every process the guest had before the probe, and still has, is visible
    # under its guest pid (one that ended meanwhile, e.g. a runlevel helper, is not).
    still = set(before) & set(guest_pids(lab, bb))
    assert still <= pids, (still, pids)
    # The host does see the guest's process (the guest is a child pid namespace).
    assert any(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x00123")
               for p in lab.host_pids(bb))


def test_guest_cannot_kill_host_process(lab: Lab, host_sleep: subprocess.Popen[bytes]) -> None:
    name = lab.guest("killer")  # kill -1 takes the guest's own daemons down: not the shared one
    hostpid = host_sleep.pid
    init_before = lab.init_pid(name)
    code, out = lab.run(name, f"""
        sleep 300 & mine=$!
        kill -9 {hostpid}; echo kill_host=$?
        kill -9 -1; echo kill_all=$?
        wait $mine; echo mine_status=$?
    """)
    assert code == 0, out
    # The host pid does not exist in the guest's pid namespace.
    assert "kill_host=0" not in out
    # kill -1 really fired (the guest's own sleep died of it) ...
    assert "mine_status=137" in out
    # ... and reached nothing outside the guest.
    time.sleep(0.2)
    assert host_sleep.poll() is None
    assert guest.running(lab.paths, name)
    assert lab.init_pid(name) == init_before
    # Positive twin: the host can signal its own process.
    os.kill(hostpid, 0)


def test_two_guests_cannot_see_each_other(lab: Lab, bb: str) -> None:
    other = lab.guest("bb2")
    code, _ = lab.run(bb, "sleep 301 >/dev/null 2>&1 &")
    assert code == 0
    code, _ = lab.run(other, "sleep 302 >/dev/null 2>&1 & echo x > /dev/shm/bb2-was-here")
    assert code == 0
    for me, mine, theirs in ((bb, "sleep 301", "sleep 302"), (other, "sleep 302", "sleep 301")):
        code, out = lab.run(me, "ps -o pid,args; ls /dev/shm; hostname")
        assert code == 0, out
        assert mine in out
        assert theirs not in out
        listed = {ln.split()[0] for ln in out.splitlines() if re.match(r"^\s*\d+\s", ln)}
        # ps lists the guest's own processes (by their guest pids) ...
        assert set(guest_pids(lab, me)) <= listed, (out, guest_pids(lab, me))
        # ... and none of the neighbour's, whatever pid they have there.
        assert all(f" {theirs}" not in ln for ln in out.splitlines())
        assert out.strip().endswith(me)
    code, out = lab.run(bb, "cat /dev/shm/bb2-was-here")
    assert code != 0, "/dev/shm is shared between guests"
    # Neither can signal the other's processes by their host pids.
    pids = " ".join(str(p) for p in lab.host_pids(other))
    code, out = lab.run(bb, f"for p in {pids}; do kill -9 $p 2>/dev/null && echo hit=$p; done")
    assert "hit=" not in out
    assert guest.running(lab.paths, other)


# --- GE2: chroot escapes ----------------------------------------------------------

def test_double_chroot_escape_stays_inside(lab: Lab, bb: str) -> None:
    tag = uuid.uuid4().hex[:10]
    host_marker = lab.paths.rootdir.parent / f"host-only-{tag}"
    guest_marker = lab.root(bb) / f"guest-marker-{tag}"
    host_marker.write_text("host\n")
    guest_marker.write_text("guest\n")
    try:
        # busybox `chroot` always chdirs into the new root, so the jail is
        # entered with nsenter --root --wd, which leaves the working directory
        # outside the new root: the state the classic double chroot relies on.
        inner = (
            f'cd ..; cd ../../..; for i in 1 2 3 4 5 6 7 8; do cd ..; done; '
            f'chroot . /bin/sh -c "'
            f'ls /; test -e /guest-marker-{tag} && echo ESCAPED_TO_GUEST_ROOT; '
            f'test -e {host_marker} && echo HOST_MARKER_VISIBLE; '
            f'readlink /proc/1/exe | grep -q vpanel-init && echo GUEST_PROC_AT_ROOT; true"'
        )
        code, out = lab.run(bb, f"""
            J=/tmp/jail-{tag}
            mkdir -p $J/bin $J/sub && cp /bin/busybox $J/bin/busybox
            for a in sh chroot ls test cat grep true; do ln -sf busybox $J/bin/$a; done
            chroot $J /bin/sh -c 'test -e /guest-marker-{tag} || echo JAIL_CONFINES; ls /'
            nsenter --root=$J --wd=/ /bin/sh -c {shlex.quote(inner)}
            echo nsenter=$?
            rm -rf $J
        """)
        assert code == 0, out
        # Positive: the jail confines, and the classic escape does break out of it ...
        assert "JAIL_CONFINES" in out
        assert "nsenter=0" in out
        assert "ESCAPED_TO_GUEST_ROOT" in out
        # ... but only up to the guest's root: pivot_root left no host tree above it.
        assert "HOST_MARKER_VISIBLE" not in out
        assert "GUEST_PROC_AT_ROOT" in out
        assert not os.path.lexists(lab.paths.rootdir.parent / f"jail-{tag}")
    finally:
        host_marker.unlink()
        guest_marker.unlink()
    # The guest's mount namespace holds only the guest tree: no mount outside it.
    with open(f"/proc/{lab.init_pid(bb)}/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    assert points[0] == "/"
    assert all(p == "/" or p.startswith(("/proc", "/sys", "/dev")) for p in points), points


# --- GE7: mounts ------------------------------------------------------------------

def _host_mounts_mentioning(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line for line in f if str(path) in line]


def test_guest_cannot_mount(lab: Lab, bb: str) -> None:
    root = lab.root(bb)
    host_before = _host_mounts_mentioning(root)
    with open(f"/proc/{lab.init_pid(bb)}/mountinfo", encoding="utf-8") as f:
        guest_before = f.read()
    attempts = [
        "mount -t proc proc /mnt",
        "mount -t tmpfs tmpfs /mnt",
        "mount -t sysfs sysfs /mnt",
        "mount -t cgroup2 none /mnt",
        "mount -t binfmt_misc none /mnt",
        "mount --bind /tmp /mnt",
        "mount -o remount,rw /proc/sys",
        "mount -o remount,rw /sys",
        "mount -o remount,rw,suid,dev /",
        "umount /proc/sys",
        "umount -l /proc/keys",
        "umount -l /proc",
    ]
    script = "\n".join(
        f"if {a} 2>/dev/null; then echo 'MOUNTED: {a}'; else echo 'refused: {a}'; fi"
        for a in attempts
    )
    code, out = lab.run(bb, script + "\necho x > /proc/sys/kernel/domainname; echo ro=$?")
    assert code == 0, out
    assert "MOUNTED" not in out, out
    assert out.count("refused: ") == len(attempts)
    assert "ro=0" not in out  # /proc/sys is still read-only after the remount attempt
    with open(f"/proc/{lab.init_pid(bb)}/mountinfo", encoding="utf-8") as f:
        assert f.read() == guest_before
    assert _host_mounts_mentioning(root) == host_before


# --- GE4: devices -----------------------------------------------------------------

def test_guest_cannot_mknod_block_device(lab: Lab, bb: str) -> None:
    code, out = lab.run(bb, """
        for n in "/tmp/sda b 8 0" "/tmp/mem c 1 1" "/tmp/kmsg c 1 11" "/dev/shm/sda b 8 0" \
                 "/dev/sda b 8 0"; do
            set -- $n
            if mknod "$1" "$2" "$3" "$4" 2>/dev/null; then echo "MADE $1"
            else echo "refused $1"; fi
        done
        for f in /dev/* /dev/.[!.]*; do
            [ -e "$f" ] || [ -L "$f" ] || continue
            echo "entry $(basename $f) $(stat -c '%F %t:%T' $f)"
        done
    """)
    assert code == 0, out
    assert "MADE" not in out, out
    assert out.count("refused ") == 5
    for rel in ("tmp/sda", "tmp/mem", "tmp/kmsg", "dev/sda"):
        assert not os.path.lexists(lab.root(bb) / rel)

    entries = dict(re.findall(r"^entry (\S+) (.*)$", out, re.M))
    extra = set(entries) - DOCUMENTED_DEV
    # syslogd's /dev/log is a socket the guest made itself, not a device.
    if "log" in extra:
        assert entries["log"].startswith("socket")
        extra.discard("log")
    assert not extra, f"undocumented /dev entries: {extra}"
    assert set(entries) >= DOCUMENTED_DEV
    for name, kind in entries.items():
        assert "block" not in kind, (name, kind)
        if kind.startswith("character special file"):
            major, minor = (int(x, 16) for x in kind.split()[-1].split(":"))
            assert DEV_NUMBERS.get(name) == (major, minor), (name, kind)
    # Positive twin: the host can make the node (in a private temp dir).
    probe = lab.paths.rundir / f"sda-probe-{uuid.uuid4().hex[:6]}"
    os.mknod(probe, 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    probe.unlink()


# --- GE5: host-exec knobs ---------------------------------------------------------

# (path, value the attack would write). Values are chosen so that a failed
# defence does the least harm, and a changed value is put back.
HOST_KNOBS = [
    pytest.param("/proc/sys/kernel/core_pattern", "|/tmp/pwn %p", id="core_pattern"),
    pytest.param("/proc/sysrq-trigger", "h", id="sysrq_trigger"),
    pytest.param("/proc/sys/kernel/modprobe", "/tmp/pwn", id="modprobe"),
    pytest.param("/sys/kernel/uevent_helper", "/tmp/pwn", id="uevent_helper"),
    pytest.param("/proc/sys/fs/binfmt_misc/register", ":pwn:E::pwn::/tmp/pwn:",
                 id="binfmt_misc_register"),
    pytest.param("/sys/kernel/mm/ksm/run", "0", id="sysfs_ksm_run"),
    pytest.param("/proc/sys/vm/drop_caches", "1", id="drop_caches"),
]


@pytest.mark.parametrize(("knob", "value"), HOST_KNOBS)
def test_guest_cannot_write_host_kernel_knob(lab: Lab, bb: str, knob: str, value: str) -> None:
    if not os.path.exists(knob):
        pytest.skip(f"{knob} does not exist on this host's kernel")
    before = host_read(knob)
    try:
        code, out = lab.run(bb, f"""
            echo probe > /tmp/knob-probe && echo positive=ok
            test -e {knob} && echo visible=yes
            if echo {shlex.quote(value)} > {knob}; then echo WROTE; else echo refused; fi
        """)
    finally:
        after = host_read(knob)
        if before is not None and after != before:
            with contextlib.suppress(OSError), open(knob, "wb") as f:
                f.write(before)
    assert code == 0, out
    assert "positive=ok" in out  # the shell's redirection itself works
    assert "WROTE" not in out and "refused" in out, out
    if "visible=yes" in out:
        # There inside too (core_pattern always is): refused, not merely missing.
        assert re.search(r"Read-only file system|Permission denied|Operation not permitted",
                         out), out
    assert after == before


# --- GE6: leaky /proc and /sys ----------------------------------------------------

MASKED = ["/proc/kcore", "/proc/keys", "/proc/key-users", "/proc/timer_list",
          "/proc/sched_debug", "/proc/kallsyms", "/proc/interrupts", "/proc/kmsg"]


def test_guest_cannot_read_kcore_and_masked_proc_files(lab: Lab, bb: str) -> None:
    script = "\n".join(
        f"n=$(head -c 4096 {p} 2>/dev/null | wc -c); echo \"read {p} $n\"" for p in MASKED
    ) + "\nif dmesg >/dev/null 2>&1; then echo DMESG_READ; else echo dmesg=refused; fi" \
        + "\nfor d in /sys/firmware /sys/kernel/debug /sys/kernel/security /proc/acpi; do" \
        + " [ -d $d ] && echo \"dir $d $(ls -A $d | wc -l)\"; done; true"
    code, out = lab.run(bb, script)
    assert code == 0, out
    got = {p: int(n) for p, n in re.findall(r"^read (\S+) (\d+)$", out, re.M)}
    assert set(got) == set(MASKED), out
    assert all(n == 0 for n in got.values()), got
    assert "dmesg=refused" in out
    assert all(int(n) == 0 for n in re.findall(r"^dir \S+ (\d+)$", out, re.M)), out
    # Positive twin: on the host the same files hold data, so the guest's
    # empty read is the mask at work, not an empty file.
    nonempty = [p for p in ("/proc/kallsyms", "/proc/timer_list", "/proc/interrupts")
                if (host_read(p) or b"")[:1]]
    assert nonempty, "none of the masked files has content on the host"


def test_guest_cannot_read_kernel_heap_layout(lab: Lab, bb: str) -> None:
    leaky = ["/proc/slabinfo", "/proc/kpagecount", "/proc/kpageflags", "/proc/kpagecgroup",
             "/proc/vmallocinfo"]
    script = "\n".join(
        f"n=$(head -c 64 {p} 2>/dev/null | wc -c); echo \"read {p} $n\"" for p in leaky
    ) + "\necho \"slab $(ls -A /sys/kernel/slab 2>/dev/null | wc -l)\""
    code, out = lab.run(bb, script)
    assert code == 0, out
    got = {p: int(n) for p, n in re.findall(r"^read (\S+) (\d+)$", out, re.M)}
    assert all(n == 0 for n in got.values()), got
    assert re.search(r"^slab 0$", out, re.M), out


# --- setuid and file capabilities against the bounding set --------------------------

def _find_euid0_busybox(lab: Lab, name: str) -> dict[str, str]:
    """Status of the guest process running the setuid copy with euid 0."""
    found: dict[str, str] = {}

    def look() -> bool:
        for pid in lab.host_pids(name):
            try:
                text = Path(f"/proc/{pid}/status").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            st = status_fields(text)
            if cmd.startswith(b"/opt/suid/busybox\x00su") and st["Uid"].split()[1] == "0":
                found.update(st)
                return True
        return False

    assert wait_for(look), "the setuid su never ran with euid 0"
    return found


def test_setuid_root_binary_cannot_exceed_ceiling(lab: Lab, bb: str) -> None:
    # Guest root plants a setuid-root busybox (it may: CHOWN, FSETID are in its ceiling).
    code, out = lab.run(bb, "mkdir -p /opt/suid && cp /bin/busybox /opt/suid/busybox && "
                            "chmod 4755 /opt/suid/busybox && stat -c '%a %u' /opt/suid/busybox")
    assert code == 0 and "4755 0" in out, out
    try:
        # busybox drops setuid for most applets; su keeps it while it waits for
        # the password, which it reads from a pipe held open for a few seconds.
        def run_su() -> None:
            lab.run(bb, "sleep 3 | /opt/suid/busybox su root -c id", user="guest")

        t = threading.Thread(target=run_su)
        t.start()
        try:
            st = _find_euid0_busybox(lab, bb)
        finally:
            t.join(30)
        assert st["Uid"].split()[0] == "1000"  # really the guest user, made euid 0
        eff, prm = int(st["CapEff"], 16), int(st["CapPrm"], 16)
        # Positive: setuid root worked and brought capabilities ...
        assert eff != 0
        # ... but never more than the ceiling, and never CAP_SYS_ADMIN.
        assert eff & ~CEILING_MASK == 0 and prm & ~CEILING_MASK == 0
        assert not eff >> SYS_ADMIN & 1
        assert int(st["CapBnd"], 16) == CEILING_MASK
        # ping keeps euid 0 (busybox marks it setuid-maybe) and still gets no
        # raw socket: CAP_NET_RAW is outside the ceiling, so setuid cannot add it.
        code, out = lab.run(bb, "/opt/suid/busybox ping -c1 -W2 127.0.0.1; echo rc=$?",
                            user="guest")
        assert "rc=0" not in out and "1 packets received" not in out, out
        # Positive twin: the same applet as host root does get one.
        assert subprocess.run(["busybox", "ping", "-c1", "-W2", "127.0.0.1"],
                              capture_output=True, check=False).returncode == 0
        # And what that euid-0 process holds, guest root holds: no CAP_SYS_ADMIN
        # work such as sethostname, and the host's name stays.
        host_name = socket.gethostname()
        code, out = lab.run(bb, "hostname escaped-by-suid; echo rc=$?; hostname")
        assert "rc=0" not in out and "escaped-by-suid" not in out.split("rc=")[1], out
        assert socket.gethostname() == host_name
    finally:
        lab.run(bb, "rm -rf /opt/suid")


def _vfs_cap(permitted: int, effective: bool) -> bytes:
    """security.capability xattr, VFS_CAP_REVISION_2 (include/uapi/linux/capability.h)."""
    magic = 0x02000000 | (0x000001 if effective else 0)
    return struct.pack("<IIIII", magic, permitted & 0xFFFFFFFF, 0, permitted >> 32, 0)


def test_file_capabilities_cannot_exceed_ceiling(lab: Lab, bb: str) -> None:
    every_cap = (1 << (caps.last_cap() + 1)) - 1
    optdir = lab.root(bb) / "opt" / "fcap"
    code, out = lab.run(bb, "mkdir -p /opt/fcap/plain /opt/fcap/dumb && "
                            "cp /bin/busybox /opt/fcap/plain/ && cp /bin/busybox /opt/fcap/dumb/")
    assert code == 0, out
    try:
        # File capabilities asking for everything; the host sets them (a guest
        # with CAP_SETFCAP could do the same with setcap).
        os.setxattr(optdir / "plain/busybox", "security.capability", _vfs_cap(every_cap, False))
        os.setxattr(optdir / "dumb/busybox", "security.capability", _vfs_cap(every_cap, True))
        code, out = lab.run(bb, """
            /opt/fcap/plain/busybox sleep 5 & plain=$!
            /opt/fcap/dumb/busybox true; echo dumb=$?
            sleep 0.3; grep Cap /proc/$plain/status; kill $plain
        """, user="guest")
        assert code == 0, out
        st = status_fields(out)
        prm = int(st["CapPrm"], 16)
        # Positive: the file capabilities did take effect (a capability-less
        # user now holds permitted capabilities) ...
        assert prm != 0
        # ... clipped to the ceiling.
        assert prm == CEILING_MASK
        assert int(st["CapEff"], 16) & ~CEILING_MASK == 0
        # A capability-dumb binary (effective bit) that cannot get all it asks
        # for is refused outright (capabilities(7), "safety checking").
        assert "dumb=0" not in out, out
    finally:
        lab.run(bb, "pkill -f /opt/fcap/; rm -rf /opt/fcap")


# --- descriptors, cwd, root ----------------------------------------------------------

def test_no_inherited_descriptor_points_outside_guest(lab: Lab, bb: str) -> None:
    code, out = lab.run(bb, """
        sleep 30 &
        echo detached=$!
        for f in /proc/1/fd/*; do echo "fd1 $(readlink $f)"; done
        echo "cwd1 $(readlink /proc/1/cwd)"; echo "root1 $(readlink /proc/1/root)"
        echo "cwdself $(readlink /proc/self/cwd)"; echo "rootself $(readlink /proc/self/root)"
    """)
    assert code == 0, out
    fd_targets = re.findall(r"^fd1 (.*)$", out, re.M)
    assert fd_targets
    assert all(t == "/dev/null" or t.startswith("anon_inode:") for t in fd_targets), fd_targets
    for key in ("cwd1", "root1", "cwdself", "rootself"):
        assert re.search(rf"^{key} /$", out, re.M), out

    # From the host: every process of the guest, the detached sleep included.
    init_pid = lab.init_pid(bb)
    mount_ids = guest_mount_ids(init_pid)
    guest_root = os.stat(lab.root(bb))
    pids = lab.host_pids(bb)
    assert len(pids) >= 2
    for pid in pids:
        assert fds_outside_guest(pid, mount_ids) == []
        root = os.stat(f"/proc/{pid}/root")
        assert (root.st_dev, root.st_ino) == (guest_root.st_dev, guest_root.st_ino), pid
    fddir = f"/proc/{init_pid}/fd"
    init_fds = {os.readlink(f"{fddir}/{fd}") for fd in os.listdir(fddir)}
    assert init_fds <= {"/dev/null"} | {t for t in init_fds if t.startswith("anon_inode:")}
    # Positive twin: the checker does flag host files (this test process holds some).
    assert fds_outside_guest(os.getpid(), mount_ids), "the checker flags nothing"


def test_exec_without_output_hands_guest_no_host_file(lab: Lab, bb: str) -> None:
    secret = f"HOST-SECRET-{uuid.uuid4().hex}"
    hostfile = lab.paths.rundir / "exec-output.log"
    hostfile.write_text(secret + "\n")
    fd = os.open(hostfile, os.O_WRONLY | os.O_APPEND)
    saved = [os.dup(1), os.dup(2)]
    try:
        # As `vserver bb exec sh -c 'sleep 30 &' >> exec-output.log` would run it.
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        guest.exec_in(lab.paths, bb, ["/bin/sh", "-c", "sleep 31 & echo detached=$!"])
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for s in (*saved, fd):
            os.close(s)
    try:
        m = re.search(r"detached=(\d+)", hostfile.read_text())
        assert m, hostfile.read_text()
        held = f"/proc/{m.group(1)}/fd/1"
        _code, out = lab.run(bb, f"cat {held} 2>&1; echo tampered >> {held}")
        assert secret not in out, "guest root read a host file through an inherited descriptor"
        assert "tampered" not in hostfile.read_text()
        mount_ids = guest_mount_ids(lab.init_pid(bb))
        assert [b for p in lab.host_pids(bb) for b in fds_outside_guest(p, mount_ids)] == []
    finally:
        lab.run(bb, "pkill -f 'sleep 31'")
        hostfile.unlink()


def _in_pty_session(fn: Callable[[], bytes], timeout: float = 60.0) -> tuple[bytes, bytes]:
    """Run FN() in a child whose controlling terminal is a fresh pty (as a shell's would be).

    Returns (what arrived on the terminal, what FN returned). The child stays
    alive, session leader of that terminal, until the parent has read both.
    """
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            result = fn()
            os.write(w, result)
            os.close(w)
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    seen, result = b"", b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master, r], [], [], 0.5)
            if master in ready:
                with contextlib.suppress(OSError):
                    seen += os.read(master, 4096)
            if r in ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                result += chunk
        # Drain what the terminal got meanwhile.
        while select.select([master], [], [], 0.2)[0]:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            seen += data
        return seen, result
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(r)
        os.waitpid(pid, 0)
        os.close(master)


def _stat_tty_nr(pid: int) -> int | None:
    """Field 7 of /proc/PID/stat: the controlling terminal's device number, 0 for none."""
    data = host_read(f"/proc/{pid}/stat")
    if data is None:
        return None
    return int(data[data.rindex(b")") + 2:].split()[4])


def test_guest_process_cannot_reach_callers_terminal(lab: Lab, bb: str) -> None:
    """exec_in with OUTPUT (the agent's way) from a caller sitting on a terminal."""
    def probe() -> bytes:
        code, out = lab.run(bb, """
            echo GUEST-ON-HOST-TTY > /dev/tty 2>/dev/null && echo opened=yes
            echo "tty_nr $(cut -d' ' -f7 /proc/self/stat)"
        """)
        caller = _stat_tty_nr(os.getpid())
        return f"code={code} caller_tty_nr={caller}\n{out}".encode()

    seen, result = _in_pty_session(probe)
    text = result.decode()
    assert "code=0" in text, text
    # Positive twin: the caller really had a controlling terminal.
    assert "caller_tty_nr=0" not in text and "caller_tty_nr=None" not in text, text
    assert b"GUEST-ON-HOST-TTY" not in seen, "guest wrote on the host's terminal"
    assert "opened=yes" not in text
    assert re.search(r"^tty_nr 0$", text, re.M), text


def _guest_hold_on_terminal(lab: Lab, name: str, tty_nr: int) -> list[str]:
    """Guest processes whose controlling terminal is TTY_NR, or that hold a host pty."""
    found = []
    mount_ids = guest_mount_ids(lab.init_pid(name))
    for pid in lab.host_pids(name):
        if _stat_tty_nr(pid) == tty_nr:
            found.append(f"pid {pid}: controlling terminal is the caller's")
        found += [b for b in fds_outside_guest(pid, mount_ids) if "/dev/pts/" in b]
    return found


def test_exec_from_terminal_leaves_guest_no_hold_on_it(lab: Lab, bb: str) -> None:
    def probe() -> bytes:
        code = guest.exec_in(lab.paths, bb, ["/bin/sh", "-c", "sleep 32 &"])
        tty = _stat_tty_nr(os.getpid())
        assert tty
        held = _guest_hold_on_terminal(lab, bb, tty)
        return f"code={code}\n".encode() + "\n".join(held).encode()

    _seen, result = _in_pty_session(probe)
    text = result.decode()
    lab.run(bb, "pkill -f 'sleep 32'")
    assert text.startswith("code=0"), text
    assert text.strip() == "code=0", text


def test_guest_started_from_terminal_does_not_keep_it(lab: Lab) -> None:
    name = "ttystart"
    guest.build(lab.paths, name, guest.BuildOptions(method="busybox"))

    def start() -> bytes:
        guest.start(lab.paths, name)
        tty = _stat_tty_nr(os.getpid())
        assert tty
        return "\n".join(_guest_hold_on_terminal(lab, name, tty)).encode()

    _seen, result = _in_pty_session(start)
    assert guest.running(lab.paths, name)
    assert result.decode() == ""


def test_guest_cannot_rewrite_its_init_binary(lab: Lab, bb: str) -> None:
    """CVE-2019-5736: PID 1 runs from a sealed memfd, never from a host file."""
    from hostagent import context

    init_bin = context.init_binary()
    before = host_read(init_bin)
    code, out = lab.run(bb, """
        readlink /proc/1/exe
        if echo pwn > /proc/1/exe 2>/dev/null; then echo WROTE_EXE; fi
        if echo pwn >> /proc/1/exe 2>/dev/null; then echo APPENDED_EXE; fi
        true
    """)
    assert code == 0, out
    assert "memfd:vpanel-init" in out
    assert "WROTE_EXE" not in out and "APPENDED_EXE" not in out
    assert host_read(init_bin) == before


# --- GE8, GE9: namespaces and kernel interfaces refused by the lock flag ------------

def test_guest_with_lock_flag_cannot_create_namespaces(lab: Lab, bb: str) -> None:
    conf = lab.paths.conf(bb).read_text()
    assert re.search(r'^S_FLAGS="[^"]*\block\b', conf, re.M), conf
    attempts = [
        "unshare -m true", "unshare -U true", "unshare -r true", "unshare -n true",
        "unshare -p -f true", "unshare -i true", "unshare -u true", "unshare -C true",
        "nsenter -t 1 -m true", "nsenter -t 1 -u true",
    ]
    script = "unshare true && echo positive=ok\n" + "\n".join(
        f"if {a} 2>/dev/null; then echo 'ALLOWED: {a}'; else echo 'refused: {a}'; fi"
        for a in attempts
    )
    # An unprivileged user, who needs no capability for a user namespace, too.
    for user in (None, "guest"):
        code, out = lab.run(bb, script, user=user)
        assert code == 0, out
        assert "positive=ok" in out  # the applet works; unshare(0) is not refused
        assert "ALLOWED" not in out, (user, out)
        assert out.count("refused: ") == len(attempts)
    # keyctl and bpf have no busybox applet; the keyring is at least masked.
    code, out = lab.run(bb, "wc -c < /proc/keys; wc -c < /proc/key-users")
    assert code == 0 and out.split() == ["0", "0"], out


# --- GE15: cgroups ----------------------------------------------------------------

def test_guest_cannot_write_cgroup_or_see_other_cgroups(lab: Lab, bb: str) -> None:
    other = lab.guest("bb2")
    st = lab.state(bb)
    code, out = lab.run(bb, """
        cat /proc/self/cgroup /proc/1/cgroup
        ls -A /sys/fs/cgroup | sed 's/^/cgfs /'
        mkdir /sys/fs/cgroup/pwn 2>/dev/null && echo MKDIR_OK
        for f in /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/cgroup.procs \
                 /sys/fs/cgroup/*/memory.max /sys/fs/cgroup/pids.max; do
            [ -e "$f" ] && { echo 1 > "$f" 2>/dev/null && echo "WROTE $f"; }
        done
        grep -h -E ' - cgroup2? ' /proc/self/mountinfo | sed 's/^/cgmount /'
        true
    """)
    assert code == 0, out
    assert "MKDIR_OK" not in out and "WROTE" not in out, out
    assert "cgmount" not in out  # no cgroupfs is mounted in the guest
    # Every hierarchy shows the guest its own cgroup as "/": no host or neighbour names.
    paths = re.findall(r"^\d+:[^:\n]*:(\S*)$", out, re.M)
    assert paths and all(p == "/" for p in paths), out
    for leak in (lab.cgroup_parent, st.cgroup, other):
        assert leak not in out
    # Positive twin: the host sees the guest's cgroup, and the guest in it.
    assert lab.init_pid(bb) in lab.host_pids(bb)


# --- network ------------------------------------------------------------------------

def test_guest_cannot_see_host_network(lab: Lab, bb: str) -> None:
    """A guest without addresses has a network namespace holding only lo (SECURITY.md)."""
    host_links = sorted(os.listdir("/sys/class/net"))
    with open("/proc/net/unix", encoding="utf-8") as f:
        host_unix = {line.split()[-1] for line in f if line.count(" ") > 6
                     and line.split()[-1].startswith(("/", "@"))}
    code, out = lab.run(bb, """
        ls /sys/class/net | sed 's/^/link /'
        sed 1,2d /proc/net/dev | cut -d: -f1 | tr -d ' ' | sed 's/^/dev /'
        awk 'NR > 1 && NF >= 8 {print "unix " $8}' /proc/net/unix
        ip link add pwn0 type dummy 2>/dev/null && echo LINK_ADDED
        true
    """)
    assert code == 0, out
    assert re.findall(r"^link (\S+)$", out, re.M) == ["lo"], out
    assert re.findall(r"^dev (\S+)$", out, re.M) == ["lo"], out
    assert "LINK_ADDED" not in out
    guest_unix = set(re.findall(r"^unix (\S+)$", out, re.M))
    assert not (guest_unix & host_unix), guest_unix & host_unix
    # Positive twin: the host has links of its own that the guest does not see.
    assert [n for n in host_links if n != "lo"], host_links


# --- host names, clock --------------------------------------------------------------

def test_guest_cannot_change_host_hostname(lab: Lab, bb: str) -> None:
    host_before = socket.gethostname()
    domain_before = host_read("/proc/sys/kernel/domainname")
    code, out = lab.run(bb, """
        hostname
        hostname pwned-host; echo rc_hostname=$?
        echo pwned > /proc/sys/kernel/hostname; echo rc_proc=$?
        hostname
    """)
    assert code == 0, out
    assert "rc_hostname=0" not in out and "rc_proc=0" not in out, out
    assert "pwned" not in out.split("rc_proc=")[1]
    # The guest has its own name (positive: UTS namespace in place) ...
    assert out.splitlines()[0] == bb
    # ... and the host kept its own.
    assert socket.gethostname() == host_before
    assert host_read("/proc/sys/kernel/domainname") == domain_before


def test_guest_cannot_set_host_clock(lab: Lab, bb: str) -> None:
    before = time.time()
    code, out = lab.run(bb, """
        date -s '2001-01-01 00:00:00' >/dev/null 2>&1; echo "guest_year $(date +%Y)"
        adjtimex -o 10000 >/dev/null 2>&1 && echo ADJUSTED
        hwclock -s >/dev/null 2>&1 && echo HWCLOCK_SET
        true
    """)
    assert code == 0, out
    assert "ADJUSTED" not in out and "HWCLOCK_SET" not in out, out
    # busybox date reports success whatever settimeofday said; the clock is the judge.
    assert "guest_year 2001" not in out, out
    assert 0 <= time.time() - before < 120


# --- limits ---------------------------------------------------------------------

@pytest.fixture
def limited(lab: Lab) -> str:
    return lab.guest("lim", nice=5, ulimit="-H -n 256")


def test_guest_cannot_lower_nice_below_s_nice(lab: Lab, limited: str) -> None:
    # Debian's busybox has no `nice` applet; `renice -n N` adds N to the nice value.
    code, out = lab.run(limited, """
        echo "nice $(cut -d' ' -f19 /proc/self/stat)"
        sh -c 'renice -n -5 -p $$ >/dev/null 2>&1 && echo LOWERED; cut -d" " -f19 /proc/$$/stat' \
            | sed 's/^/after_lower /'
        sh -c 'renice -n -1 -p $$ >/dev/null 2>&1 && echo LOWERED; true'
        sh -c 'renice -n 3 -p $$ >/dev/null 2>&1 && echo raised=ok; cut -d" " -f19 /proc/$$/stat' \
            | sed 's/^/after_raise /'
    """)
    assert code == 0, out
    assert re.search(r"^nice 5$", out, re.M), out
    assert "LOWERED" not in out, out
    assert re.search(r"^after_lower 5$", out, re.M), out
    # Positive: being nicer is allowed.
    assert "after_raise raised=ok" in out and re.search(r"^after_raise 8$", out, re.M), out
    # The guest's PID 1 runs at S_NICE too.
    data = Path(f"/proc/{lab.init_pid(limited)}/stat").read_bytes()
    assert int(data[data.rindex(b")") + 2:].split()[16]) == 5


def test_guest_cannot_raise_its_hard_ulimit(lab: Lab, limited: str) -> None:
    code, out = lab.run(limited, """
        echo "hard $(ulimit -H -n) soft $(ulimit -S -n)"
        (ulimit -H -n 512 2>/dev/null && echo RAISED; ulimit -H -n) | sed 's/^/after_raise /'
        (ulimit -H -n unlimited 2>/dev/null && echo RAISED) ; true
        (ulimit -n 128 && ulimit -H -n) | sed 's/^/after_lower /'
    """)
    assert code == 0, out
    assert re.search(r"^hard 256 soft (\d+)$", out, re.M), out
    soft = int(re.search(r"^hard 256 soft (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert soft <= 256
    assert "RAISED" not in out, out
    assert re.search(r"^after_raise 256$", out, re.M), out
    # Positive: lowering is allowed.
    assert re.search(r"^after_lower 128$", out, re.M), out
    assert "RAISED" not in out


# --- private guests -------------------------------------------------------------

def test_private_flag_refuses_host_exec(lab: Lab, bb: str) -> None:
    name = lab.guest("priv", flags=("lock", "private"))
    assert guest.running(lab.paths, name)
    before = lab.host_pids(name)
    with pytest.raises(guest.GuestError, match="private"):
        guest.exec_in(lab.paths, name, ["/bin/sh", "-c", "touch /tmp/host-got-in"])
    with pytest.raises(guest.GuestError, match="private"):
        guest.exec_in(lab.paths, name, ["/bin/sh"], user="guest")
    assert not os.path.lexists(lab.root(name) / "tmp/host-got-in")
    assert sorted(lab.host_pids(name)) == sorted(before)
    # Positive twin: a guest without the flag takes the same command.
    assert lab.run(bb, "true")[0] == 0
