"""The cffi syscall layer: each wrapper fails with OSError and the kernel's errno."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import resource
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Callable

import pytest

from hostagent import seccomp, syscalls


def in_child(fn: Callable[[], int]) -> int:
    """Run FN in a forked child (it may change namespaces or load filters); return its code."""
    pid = os.fork()
    if pid == 0:
        try:
            code = fn()
        except BaseException:
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(
    ("call", "err"),
    [
        (lambda: syscalls.setns(-1, 0), errno.EBADF),
        (lambda: syscalls.unshare(-1), errno.EINVAL),
        (lambda: syscalls.mount("none", "/nonexistent/vpanel", "tmpfs"), errno.ENOENT),
        (lambda: syscalls.umount2("/nonexistent/vpanel"), errno.ENOENT),
        (lambda: syscalls.pivot_root("/nonexistent/a", "/nonexistent/b"), errno.ENOENT),
        (lambda: syscalls.prctl(-1), errno.EINVAL),
        (lambda: syscalls.prlimit(0, 1000), errno.EINVAL),
        (lambda: syscalls.setpriority(99, 0, 0), errno.EINVAL),
        (lambda: syscalls.sethostname("x" * 200), errno.EINVAL),
        (lambda: syscalls.setdomainname("x" * 200), errno.EINVAL),
        (lambda: syscalls.ioctl_int(-1, 0x5401), errno.EBADF),
        (lambda: syscalls.pidfd_open(-5), errno.EINVAL),
        (lambda: syscalls.pidfd_send_signal(-1, 0), errno.EBADF),
        (lambda: syscalls.close_range(5, 3), errno.EINVAL),
    ],
)
def test_wrapper_raises_oserror_with_the_kernel_errno(call: Callable[[], object], err: int) -> None:
    with pytest.raises(OSError) as exc:
        call()
    assert exc.value.errno == err


def test_path_with_nul_byte_is_refused_before_the_kernel() -> None:
    with pytest.raises(ValueError, match="NUL"):
        syscalls.mount("none", "/tmp/a\0b", "tmpfs")


def test_prlimit_reads_and_sets(root_required: None) -> None:
    soft, hard = syscalls.prlimit(0, resource.RLIMIT_NOFILE)
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower() -> int:
        syscalls.prlimit(0, resource.RLIMIT_NOFILE, (64, 128))
        return 0 if resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 128) else 1

    assert in_child(lower) == 0


def test_capget_matches_proc_status() -> None:
    eff, perm, inh = syscalls.capget()
    with open("/proc/self/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert (eff, perm, inh) == (int(fields["CapEff"], 16), int(fields["CapPrm"], 16),
                                int(fields["CapInh"], 16))


def test_bounding_set_drop_is_for_good(root_required: None) -> None:
    def drop() -> int:
        syscalls.capbset_drop(13)  # CAP_NET_RAW
        return 0 if not syscalls.capbset_read(13) else 1

    assert in_child(drop) == 0
    assert syscalls.capbset_read(13)  # the parent keeps it


def test_pidfd_signals_only_the_process_it_names() -> None:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    fd = syscalls.pidfd_open(pid)
    try:
        syscalls.pidfd_send_signal(fd, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WTERMSIG(status) == signal.SIGTERM
        # The process is gone: the pidfd can never reach a recycled pid.
        with pytest.raises(ProcessLookupError):
            syscalls.pidfd_send_signal(fd, signal.SIGTERM)
    finally:
        os.close(fd)


def test_unshare_and_hostname_stay_in_the_new_namespace(root_required: None) -> None:
    before = os.uname().nodename

    def child() -> int:
        syscalls.unshare(syscalls.CLONE_NEWUTS)
        syscalls.sethostname("vpanel-syscall-test")
        return 0 if os.uname().nodename == "vpanel-syscall-test" else 1

    assert in_child(child) == 0
    assert os.uname().nodename == before


def test_fork_into_new_pid_namespace_makes_pid_1(root_required: None) -> None:
    pid = syscalls.fork_into(syscalls.CLONE_NEWPID)
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _busy_elsewhere(stop: threading.Event) -> None:
    """What the agent's other threads do meanwhile: hooks and compression,
    which fork, allocate and take libc locks with the GIL released."""
    data = os.urandom(1 << 20)
    while not stop.is_set():
        subprocess.run(["true"], check=True)
        zlib.compress(data, 1)


def test_fork_into_from_a_threaded_process_never_leaves_the_child_stuck(
        root_required: None) -> None:
    # A raw clone3 from one thread while another holds a libc lock used to
    # leave the child waiting on that lock forever; fork_into now clones from
    # a single-threaded intermediate there. Each child must run to its exit
    # and still be ours to reap.
    stop = threading.Event()
    busy = [threading.Thread(target=_busy_elsewhere, args=(stop,)) for _ in range(2)]
    for t in busy:
        t.start()

    def one(_: int) -> int:
        pid = syscalls.fork_into(syscalls.CLONE_NEWPID | syscalls.CLONE_NEWUTS)
        if pid == 0:
            zlib.compress(b"x" * 100_000)  # allocate in the child
            os._exit(0 if os.getpid() == 1 else 1)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return -1
            time.sleep(0.002)

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, range(200)))
    finally:
        stop.set()
        for t in busy:
            t.join()
    assert codes == [0] * 200


def test_seccomp_filter_refuses_keyctl_and_bpf_with_eperm(root_required: None) -> None:
    def child() -> int:
        seccomp.load(seccomp.SeccompPolicy())
        libc = syscalls._libc
        ffi = syscalls._ffi
        failures = 0
        # keyctl(KEYCTL_GET_KEYRING_ID=0, ...) and bpf(BPF_PROG_LOAD=5, NULL, 0):
        # x86_64 numbers 250 and 321, taken from the kernel's syscall_64.tbl.
        for nr in (250, 321):
            ret = libc.syscall(ffi.cast("long", nr), ffi.cast("long", 0), ffi.cast("long", 0),
                               ffi.cast("long", 0))
            if ret != -1 or ffi.errno != errno.EPERM:
                failures += 1
        return failures

    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers in this test are x86_64's")
    assert in_child(child) == 0


def test_lock_policy_refuses_new_namespaces(root_required: None) -> None:
    def child() -> int:
        seccomp.load(seccomp.SeccompPolicy(deny=()).with_lock())
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
        except OSError as e:
            return 0 if e.errno == errno.EPERM else 2
        return 1

    assert in_child(child) == 0
