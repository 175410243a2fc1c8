"""Seccomp filters for guests, compiled by the system's libseccomp.

libseccomp turns a list of rules into BPF for every architecture the guest
may use, which is exactly the part that is easy to get wrong by hand (x32
and i386 syscall numbers on an x86_64 host are the classic bypass), so we
load it through cffi rather than writing BPF ourselves.

The default filter allows everything and refuses, with EPERM, the calls that
reach kernel surfaces a guest has no business touching even with a reduced
capability ceiling (reference/security.md, section 2; moby's default profile).
"""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cffi import FFI

__all__ = [
    "DEFAULT_DENY",
    "NAMESPACE_FLAGS",
    "SeccompError",
    "SeccompPolicy",
    "compile_policy",
    "load",
    "preload",
    "warm",
]

# Calls that are refused in every guest, and why.
DEFAULT_DENY: dict[str, str] = {
    "kexec_load": "replaces the running kernel",
    "kexec_file_load": "replaces the running kernel",
    "init_module": "loads kernel code",
    "finit_module": "loads kernel code",
    "delete_module": "unloads kernel code",
    "open_by_handle_at": "opens host files by handle, bypassing the root (CVE-2014-9357)",
    "name_to_handle_at": "the probe half of open_by_handle_at",
    "keyctl": "the kernel keyring is not namespaced; guest root shares uid 0 with the host",
    "add_key": "the kernel keyring is not namespaced",
    "request_key": "the kernel keyring is not namespaced",
    "bpf": "loads programs into the kernel",
    "perf_event_open": "reads host-wide performance and timing data",
    "userfaultfd": "stalls kernel threads at will, the staple of race exploits",
    "io_uring_setup": "a second syscall interface that bypasses seccomp for its operations",
    "io_uring_enter": "see io_uring_setup",
    "io_uring_register": "see io_uring_setup",
    "lookup_dcookie": "host-wide profiling interface",
    "acct": "turns on host-wide process accounting",
    "swapon": "host memory management",
    "swapoff": "host memory management",
    "syslog": "the host's kernel log",
    "quotactl": "host-wide quota control",
    "fanotify_init": "host-wide file access monitoring",
    "mount_setattr": "changes the attributes of mounts the host set up",
    "open_tree": "new mount API, outside what the guest needs",
    "move_mount": "new mount API",
    "fsopen": "new mount API",
    "fsmount": "new mount API",
    "fsconfig": "new mount API",
    "fspick": "new mount API",
}

# Namespace flags refused by the `lock` flag (the seed: "no new contexts").
NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET,TIME}

# libseccomp <seccomp.h>
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_CMP_MASKED_EQ = 7
# include/uapi/linux/audit.h: the architectures a guest binary may use on this host.
_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_AUDIT_ARCH_X32 = 0x4000003E
_EXTRA_ARCHES = {"x86_64": (_AUDIT_ARCH_I386, _AUDIT_ARCH_X32)}

_ffi = FFI()
_ffi.cdef(
    """
    typedef void *scmp_filter_ctx;
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    scmp_filter_ctx seccomp_init(uint32_t def_action);
    void seccomp_release(scmp_filter_ctx ctx);
    int seccomp_arch_add(scmp_filter_ctx ctx, uint32_t arch_token);
    int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
    int seccomp_syscall_resolve_name(const char *name);
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                               unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
    int seccomp_load(const scmp_filter_ctx ctx);
    int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
    struct sock_fprog { unsigned short len; void *filter; };
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);
    """
)
_lib: Any = None
_libc: Any = _ffi.dlopen(None)
_compiled: dict[SeccompPolicy, bytes] = {}
# include/uapi/linux/prctl.h, include/uapi/linux/seccomp.h
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class SeccompError(OSError):
    """libseccomp refused a step; errno and the step are in the message."""


def _libseccomp() -> Any:
    global _lib
    if _lib is None:
        try:
            _lib = _ffi.dlopen("libseccomp.so.2")
        except OSError as e:
            raise SeccompError(
                errno.ENOSYS, f"libseccomp.so.2 not found ({e}); apt-get install libseccomp2"
            ) from e
    return _lib


def preload() -> None:
    """dlopen libseccomp now, while the host's libraries are still in view."""
    _libseccomp()


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise SeccompError(-ret, f"seccomp {what}: {errno.errorcode.get(-ret, -ret)}")


@dataclass(frozen=True)
class SeccompPolicy:
    """What a guest's filter refuses."""

    deny: tuple[str, ...] = tuple(DEFAULT_DENY)
    deny_namespaces: bool = False  # the `lock` flag

    def with_lock(self) -> SeccompPolicy:
        return SeccompPolicy(self.deny, True)


def _add(
    lib: Any,
    ctx: Any,
    name: str,
    conds: Iterable[tuple[int, int, int]] = (),
    err: int = errno.EPERM,
) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        # Not a call this libseccomp knows for this architecture (e.g. a newer
        # one): nothing to refuse, and an unknown call fails with ENOSYS anyway.
        return
    arr = [(arg, _SCMP_CMP_MASKED_EQ, mask, val) for arg, mask, val in conds]
    cmp = _ffi.new("struct scmp_arg_cmp[]", arr) if arr else _ffi.NULL
    _check(
        lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO | err, nr, len(arr), cmp),
        f"rule {name}",
    )


def compile_policy(policy: SeccompPolicy) -> bytes:
    """POLICY as a classic BPF program, built by libseccomp once per process.

    Building the filter costs about 4 ms (three architectures, every rule);
    loading a ready program costs microseconds, and a guest start or an
    exec into a guest needs one each.
    """
    cached = _compiled.get(policy)
    if cached is not None:
        return cached
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if ctx == _ffi.NULL:
        raise SeccompError(errno.ENOMEM, "seccomp_init failed")
    try:
        # No no_new_privs: setuid programs inside the guest must keep working
        # within its capability ceiling. Installing a filter without it needs
        # CAP_SYS_ADMIN, which the launcher still holds at that point.
        _check(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 0), "attr NNP")
        for arch in _EXTRA_ARCHES.get(platform.machine(), ()):
            ret = lib.seccomp_arch_add(ctx, arch)
            if ret != -errno.EEXIST:
                _check(ret, f"arch {arch:#x}")
        for name in policy.deny:
            _add(lib, ctx, name)
        if policy.deny_namespaces:
            flags = NAMESPACE_FLAGS
            # unshare(flags) and clone(flags, ...) with any CLONE_NEW* bit set,
            # one rule per bit because MASKED_EQ tests equality under a mask.
            bit = 1
            while bit <= flags:
                if flags & bit:
                    _add(lib, ctx, "unshare", [(0, bit, bit)])
                    _add(lib, ctx, "clone", [(0, bit, bit)])
                bit <<= 1
            # setns joins existing namespaces: refused outright. clone3 passes
            # its flags in memory that seccomp cannot read, so it answers
            # ENOSYS, which makes glibc fall back to clone(2), whose flags the
            # rules above do see (moby's profile does the same).
            _add(lib, ctx, "setns")
            _add(lib, ctx, "clone3", err=errno.ENOSYS)
        r, w = os.pipe()
        try:
            ret = lib.seccomp_export_bpf(ctx, w)
            os.close(w)
            w = -1
            _check(ret, "export")
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        lib.seccomp_release(ctx)
    prog = b"".join(chunks)
    if not prog or len(prog) % 8:
        raise SeccompError(errno.EINVAL, f"libseccomp exported {len(prog)} bytes of BPF")
    _compiled[policy] = prog
    return prog


def warm(policy: SeccompPolicy) -> None:
    """Build POLICY and resolve the loader's types now, before any fork (see syscalls.warm)."""
    compile_policy(policy)
    _libc.prctl  # noqa: B018 - resolving the symbol is the point
    buf = _ffi.from_buffer(b"\0" * 8)
    _ffi.new("struct sock_fprog *", [1, _ffi.cast("void *", buf)])
    _ffi.cast("uintptr_t", 0)


def load(policy: SeccompPolicy) -> None:
    """Install POLICY on the calling thread, for it and every child it makes."""
    prog = compile_policy(policy)
    buf = _ffi.from_buffer(prog)
    fprog = _ffi.new("struct sock_fprog *", [len(prog) // 8, _ffi.cast("void *", buf)])
    ret = _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER,
                      int(_ffi.cast("uintptr_t", fprog)), 0, 0)
    if ret < 0:
        err = _ffi.errno
        raise SeccompError(err, f"seccomp load: {os.strerror(err)}")
