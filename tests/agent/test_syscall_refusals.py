"""What the kernel refuses: the default seccomp filter, call by call, and the
wrappers' errors that test_syscalls.py does not reach (capget, capset, clone3)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from hostagent import seccomp, syscalls

# The calls the foundation issue names: each reaches the host's kernel in a way
# the capability ceiling alone does not stop.
MUST_DENY = ("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
             "open_by_handle_at", "keyctl", "add_key", "request_key", "bpf",
             "perf_event_open", "userfaultfd")


def in_child(fn: Callable[[], int]) -> int:
    """Run FN in a forked child (it may load a filter or drop capabilities); its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        except BaseException as e:
            os.write(2, f"child: {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_default_filter_names_each_call_with_its_reason() -> None:
    missing = [n for n in MUST_DENY if not seccomp.DEFAULT_DENY.get(n)]
    assert missing == []


def test_default_filter_refuses_each_call_with_eperm(root_required: None) -> None:
    lib = seccomp._libseccomp()
    numbers = {n: lib.seccomp_syscall_resolve_name(n.encode()) for n in MUST_DENY}
    assert all(nr >= 0 for nr in numbers.values()), numbers
    libc, ffi = syscalls._libc, syscalls._ffi
    minus1 = ffi.cast("long", -1)

    def child() -> int:
        seccomp.load(seccomp.SeccompPolicy())
        through = []
        for name, nr in numbers.items():
            # Every argument -1: were the filter to miss a call, the kernel
            # would refuse it for its arguments (EBADF, EFAULT, EINVAL) and
            # change nothing; only EPERM is the filter's answer.
            ret = libc.syscall(ffi.cast("long", nr), minus1, minus1, minus1, minus1, minus1,
                               minus1)
            if ret != -1 or ffi.errno != errno.EPERM:
                through.append(f"{name}={ret}/{errno.errorcode.get(ffi.errno)}")
        if through:
            os.write(2, f"not refused: {' '.join(through)}\n".encode())
            return 1
        # The positive twin: an ordinary call still goes through the filter.
        return 0 if os.getppid() > 0 and os.uname().sysname == "Linux" else 2

    assert in_child(child) == 0


@pytest.mark.parametrize(
    ("call", "err"),
    [
        (lambda: syscalls.capget(-1), errno.EINVAL),
        # Effective outside permitted: refused before anything changes.
        (lambda: syscalls.capset(1 << 40, 0, 0), errno.EPERM),
        (lambda: syscalls.fork_into(0x00010000), errno.EINVAL),  # CLONE_THREAD alone
    ],
)
def test_capability_and_clone_wrappers_fail_with_the_kernel_errno(
        call: Callable[[], object], err: int) -> None:
    def child() -> int:
        try:
            if call() == 0:  # a clone that should have failed: the child leaves at once
                os._exit(3)
        except OSError as e:
            return 0 if e.errno == err else 1
        return 2

    assert in_child(child) == 0


def test_fork_into_a_cgroup_that_is_not_a_directory_is_refused() -> None:
    fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as exc:
            if syscalls.fork_into(0, cgroup_fd=fd) == 0:
                os._exit(3)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)
