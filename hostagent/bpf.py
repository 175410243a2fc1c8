"""bpf(2) through cffi, a tiny eBPF assembler, and the programs that pin a cgroup
to a set of IP addresses (the seed's ipv4root, which chbind uses).

Like syscalls.py, the wrapper raises OSError with the kernel's errno and keeps
every constant next to the header it comes from. There is no compiler on the
hosts vpanel targets, so the programs are assembled here from raw
instructions; each is checked by the kernel verifier when it is loaded, and a
refusal carries the verifier's log.

Where the constants come from (Linux UAPI headers):
  BPF_LD..BPF_JMP, BPF_W/H/B, BPF_MEM, BPF_K/X, BPF_JA/JEQ
                      include/uapi/linux/bpf_common.h
  BPF_JMP32, BPF_ALU64, BPF_DW, BPF_MOV, BPF_JNE, BPF_CALL, BPF_EXIT,
  enum bpf_cmd, enum bpf_prog_type, enum bpf_attach_type, BPF_F_ALLOW_MULTI,
  union bpf_attr, struct bpf_insn, struct bpf_sock, struct bpf_sock_addr,
  BPF_FUNC_bind (64), BPF_FUNC_set_retval (187)
                      include/uapi/linux/bpf.h
  AF_*, SOCK_*        include/linux/socket.h, include/linux/net.h
  IPPROTO_*           include/uapi/linux/in.h
  errno values        include/uapi/asm-generic/errno-base.h, errno.h
  SYS_bpf             arch/x86/entry/syscalls/syscall_64.tbl (321),
                      include/uapi/asm-generic/unistd.h (280, arm64)
"""

from __future__ import annotations

import errno as _errno
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from cffi import FFI

__all__ = [
    "BPF_CGROUP_INET4_BIND",
    "BPF_CGROUP_INET4_CONNECT",
    "BPF_CGROUP_INET6_BIND",
    "BPF_CGROUP_INET6_CONNECT",
    "BPF_CGROUP_INET_SOCK_CREATE",
    "BPF_CGROUP_UDP4_SENDMSG",
    "BPF_CGROUP_UDP6_SENDMSG",
    "BPF_F_ALLOW_MULTI",
    "BPF_PROG_TYPE_CGROUP_SOCK",
    "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
    "MAX_ADDRESSES",
    "AddressPolicy",
    "Asm",
    "BPFError",
    "Program",
    "address_programs",
    "confine_cgroup",
    "prog_attach",
    "prog_load",
]

# --- include/uapi/linux/bpf_common.h ----------------------------------------
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_W = 0x00  # 32-bit
BPF_H = 0x08  # 16-bit
BPF_B = 0x10  # 8-bit
BPF_MEM = 0x60
BPF_K = 0x00  # operand is the immediate
BPF_X = 0x08  # operand is the source register
BPF_ADD = 0x00
BPF_JA = 0x00
BPF_JEQ = 0x10

# --- include/uapi/linux/bpf.h: instruction set ------------------------------
BPF_JMP32 = 0x06  # "jmp mode in word width": compares the low 32 bits
BPF_ALU64 = 0x07
BPF_DW = 0x18  # 64-bit
BPF_MOV = 0xB0
BPF_JNE = 0x50
BPF_CALL = 0x80
BPF_EXIT = 0x90
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)  # BPF_REG_0..BPF_REG_10

# --- include/uapi/linux/bpf.h: enum bpf_cmd ---------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8

# --- include/uapi/linux/bpf.h: enum bpf_prog_type ---------------------------
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18

# --- include/uapi/linux/bpf.h: enum bpf_attach_type -------------------------
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15

# --- include/uapi/linux/bpf.h: attach flags, helpers ------------------------
# MULTI: programs attached below ours run too, and ours still run after them
# ("programs of sub-cgroup are executed first, then programs of this cgroup"),
# so a nested confinement can only narrow this one.
BPF_F_ALLOW_MULTI = 1 << 1
BPF_FUNC_bind = 64  # long bpf_bind(struct bpf_sock_addr *ctx, struct sockaddr *addr, int len)
BPF_FUNC_set_retval = 187  # int bpf_set_retval(int retval): errno the syscall returns

# --- include/uapi/linux/bpf.h: struct bpf_sock_addr (ctx of CGROUP_SOCK_ADDR)
SA_USER_FAMILY = 0  # u32, 4-byte read
SA_USER_IP4 = 4  # u32, network order; 1,2,4-byte read, 4-byte write
SA_USER_IP6 = 8  # u32[4], network order; 1,2,4,8-byte read, 4,8-byte write
SA_USER_PORT = 24  # u32, network order
SA_FAMILY = 28  # u32, 4-byte read
SA_TYPE = 32  # u32, 4-byte read
SA_PROTOCOL = 36  # u32, 4-byte read
SA_MSG_SRC_IP4 = 40  # u32, network order; 1,2,4-byte read, 4-byte write
SA_MSG_SRC_IP6 = 44  # u32[4], network order; 1,2,4,8-byte read, 4,8-byte write
SA_SK = 64  # __bpf_md_ptr(struct bpf_sock *, sk): 8-byte read

# --- include/uapi/linux/bpf.h: struct bpf_sock (ctx of CGROUP_SOCK, and *sk) -
SK_FAMILY = 4
SK_TYPE = 8
SK_PROTOCOL = 12
SK_SRC_IP4 = 24  # u32, network order; 1,2,4-byte read
SK_SRC_IP6 = 28  # u32[4], network order; 1,2,4-byte read

# --- socket constants ---------------------------------------------------------
AF_INET = 2
AF_INET6 = 10
SOCK_DGRAM = 2
SOCK_RAW = 3
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
SOCKADDR_IN_LEN = 16  # struct sockaddr_in: family u16, port u16, addr u32, zero[8]
SOCKADDR_IN6_LEN = 28  # struct sockaddr_in6: family, port, flowinfo u32, addr[16], scope_id u32

# The seed's kernel kept 16 addresses per ipv4root (util-vserver chbind.c,
# "Too many IP numbers, max 16"); it also bounds the programs' length.
MAX_ADDRESSES = 16

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}

_ffi = FFI()
_ffi.cdef(
    """
    /* union bpf_attr, the member used by BPF_PROG_LOAD (up to expected_attach_type) */
    struct vp_bpf_prog_load {
        uint32_t prog_type;
        uint32_t insn_cnt;
        uint64_t insns;
        uint64_t license;
        uint32_t log_level;
        uint32_t log_size;
        uint64_t log_buf;
        uint32_t kern_version;
        uint32_t prog_flags;
        char prog_name[16];
        uint32_t prog_ifindex;
        uint32_t expected_attach_type;
    };
    /* union bpf_attr, the member used by BPF_PROG_ATTACH/DETACH */
    struct vp_bpf_prog_attach {
        uint32_t target_fd;
        uint32_t attach_bpf_fd;
        uint32_t attach_type;
        uint32_t attach_flags;
    };
    long syscall(long number, ...);
    """
)
_libc: Any = _ffi.dlopen(None)


class BPFError(OSError):
    """bpf(2) failed; for a refused program, the message holds the verifier's log."""


def _sys_bpf() -> int:
    try:
        return _SYS_BPF[platform.machine()]
    except KeyError:
        raise BPFError(_errno.ENOSYS,
                       f"bpf: unknown syscall number on {platform.machine()}") from None


def _bpf(cmd: int, attr: Any, what: str) -> int:
    ret = int(_libc.syscall(_ffi.cast("long", _sys_bpf()), _ffi.cast("int", cmd),
                            _ffi.cast("void *", attr),
                            _ffi.cast("unsigned int", _ffi.sizeof(attr[0]))))
    if ret < 0:
        err = _ffi.errno
        hint = {
            _errno.ENOSYS: " (kernel built without CONFIG_BPF_SYSCALL)",
            _errno.EPERM: " (needs CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN)",
        }.get(err, "")
        raise BPFError(err, f"{what}: {os.strerror(err)}{hint}")
    return ret


def prog_load(prog_type: int, insns: bytes, *, expected_attach_type: int, name: str,
              license: str = "GPL") -> int:
    """BPF_PROG_LOAD: verify and load INSNS; returns the program's fd (close-on-exec).

    The first attempt runs without a log (the verifier is faster so); a refusal
    is repeated with log_level 1, and the log goes into the BPFError.
    """
    code = _ffi.from_buffer(insns)
    lic = _ffi.new("char[]", license.encode())
    attr = _ffi.new("struct vp_bpf_prog_load *")
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns) // 8
    attr.insns = int(_ffi.cast("uintptr_t", code))
    attr.license = int(_ffi.cast("uintptr_t", lic))
    attr.expected_attach_type = expected_attach_type
    raw_name = name.encode()[:15]  # BPF_OBJ_NAME_LEN 16, NUL included; [A-Za-z0-9_.]
    _ffi.memmove(attr.prog_name, raw_name, len(raw_name))
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"BPF_PROG_LOAD {name}")
    except BPFError as first:
        if first.errno not in (_errno.EINVAL, _errno.EACCES, _errno.E2BIG):
            raise
        log = _ffi.new("char[]", 1 << 20)
        attr.log_level = 1
        attr.log_size = 1 << 20
        attr.log_buf = int(_ffi.cast("uintptr_t", log))
        try:
            return _bpf(BPF_PROG_LOAD, attr, f"BPF_PROG_LOAD {name}")
        except BPFError as e:
            text = _ffi.string(log).decode(errors="replace").strip()
            raise BPFError(e.errno, f"{e.strerror}; verifier log:\n{text}") from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    """BPF_PROG_ATTACH: attach a loaded program to a cgroup v2 directory fd."""
    attr = _ffi.new("struct vp_bpf_prog_attach *")
    attr.target_fd = target_fd
    attr.attach_bpf_fd = prog_fd
    attr.attach_type = attach_type
    attr.attach_flags = flags
    _bpf(BPF_PROG_ATTACH, attr, f"BPF_PROG_ATTACH type {attach_type}")


# --- assembler ----------------------------------------------------------------

def _s32(value: int) -> int:
    """An immediate as the s32 the instruction holds (u32 values wrap)."""
    if not -(1 << 31) <= value < (1 << 32):
        raise ValueError(f"immediate {value:#x} does not fit 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value


def words(packed: bytes) -> list[int]:
    """Network-order address bytes as the u32 values a 4-byte load of them gives."""
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, len(packed), 4)]


@dataclass
class Asm:
    """Builds struct bpf_insn {u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm}.

    Jumps name a label; assemble() turns it into the offset from the next
    instruction, which is what the verifier expects.
    """

    _insns: list[tuple[int, int, int, int | str, int]] = field(default_factory=list)
    _labels: dict[str, int] = field(default_factory=dict)
    _fresh: int = 0

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0,
              imm: int = 0) -> None:
        self._insns.append((code, dst, src, off, _s32(imm)))

    def fresh(self, stem: str) -> str:
        self._fresh += 1
        return f"{stem}.{self._fresh}"

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} defined twice")
        self._labels[name] = len(self._insns)

    # ALU
    def mov64_reg(self, dst: int, src: int) -> None:
        self._emit(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)

    def mov64_imm(self, dst: int, imm: int) -> None:
        """dst = imm, sign-extended to 64 bits."""
        self._emit(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm=imm)

    def mov32_imm(self, dst: int, imm: int) -> None:
        """dst = imm as u32 (upper half zeroed)."""
        self._emit(BPF_ALU | BPF_MOV | BPF_K, dst, imm=imm)

    def add64_imm(self, dst: int, imm: int) -> None:
        self._emit(BPF_ALU64 | BPF_ADD | BPF_K, dst, imm=imm)

    # memory
    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        """dst = *(size *)(src + off)."""
        self._emit(BPF_LDX | size | BPF_MEM, dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        """*(size *)(dst + off) = src. The only store the verifier allows into a ctx."""
        self._emit(BPF_STX | size | BPF_MEM, dst, src, off)

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        """*(size *)(dst + off) = imm (stack only here)."""
        self._emit(BPF_ST | size | BPF_MEM, dst, 0, off, imm)

    # jumps
    def jeq32(self, reg: int, imm: int, target: str) -> None:
        """if (u32)reg == (u32)imm goto target. JMP32, so an address with its top
        bit set is not compared against a sign-extended immediate."""
        self._emit(BPF_JMP32 | BPF_JEQ | BPF_K, reg, 0, target, imm)

    def jne32(self, reg: int, imm: int, target: str) -> None:
        self._emit(BPF_JMP32 | BPF_JNE | BPF_K, reg, 0, target, imm)

    def jeq64(self, reg: int, imm: int, target: str) -> None:
        self._emit(BPF_JMP | BPF_JEQ | BPF_K, reg, 0, target, imm)

    def jne64(self, reg: int, imm: int, target: str) -> None:
        self._emit(BPF_JMP | BPF_JNE | BPF_K, reg, 0, target, imm)

    def ja(self, target: str) -> None:
        self._emit(BPF_JMP | BPF_JA, off=target)

    def call(self, helper: int) -> None:
        self._emit(BPF_JMP | BPF_CALL, imm=helper)

    def exit(self) -> None:
        self._emit(BPF_JMP | BPF_EXIT)

    def ret(self, value: int) -> None:
        self.mov64_imm(R0, value)
        self.exit()

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, dst, src, off, imm) in enumerate(self._insns):
            if isinstance(off, str):
                try:
                    off = self._labels[off] - (pc + 1)
                except KeyError:
                    raise ValueError(f"jump to undefined label {off}") from None
            # The dst/src nibbles follow the C bitfield order, which is the
            # byte order's: dst is the low nibble on little-endian machines.
            regs = (dst | src << 4) if sys.byteorder == "little" else (dst << 4 | src)
            out += code.to_bytes(1, "little") + regs.to_bytes(1, "little")
            out += off.to_bytes(2, sys.byteorder, signed=True)
            out += imm.to_bytes(4, sys.byteorder, signed=True)
        return bytes(out)


# --- the ipv4root programs ------------------------------------------------------

LOOPBACK6 = IPv6Address("::1")
MAPPED_PREFIX = words(bytes(10) + b"\xff\xff")[2]  # word 2 of ::ffff:a.b.c.d


@dataclass(frozen=True)
class AddressPolicy:
    """The addresses a cgroup may use; the first of each family is its default.

    BROADCAST may also be bound (to receive broadcasts), as the seed's
    ipv4root_bcast could. Loopback (127.0.0.0/8, ::1) always stays usable.
    """

    ipv4: tuple[IPv4Address, ...] = ()
    ipv6: tuple[IPv6Address, ...] = ()
    broadcast: IPv4Address | None = None

    def __post_init__(self) -> None:
        if not self.ipv4 and not self.ipv6:
            raise ValueError("an address policy needs at least one address")
        if len(self.ipv4) + len(self.ipv6) > MAX_ADDRESSES:
            raise ValueError(f"at most {MAX_ADDRESSES} addresses")

    def bindable4(self) -> list[IPv4Address]:
        extra = [self.broadcast] if self.ipv4 and self.broadcast is not None else []
        return [*self.ipv4, *extra]


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int
    insns: bytes


def _deny(a: Asm, err: int) -> None:
    """Return 0 (refuse) and make the syscall fail with ERR rather than EPERM."""
    a.mov64_imm(R1, -err)
    a.call(BPF_FUNC_set_retval)
    a.ret(0)


def _jeq_ip6(a: Asm, regs: Sequence[int], addr: IPv6Address, target: str) -> None:
    """Jump to TARGET if the four words in REGS equal ADDR."""
    w = words(addr.packed)
    miss = a.fresh("miss")
    for reg, word in zip(regs[:3], w[:3], strict=True):
        a.jne32(reg, word, miss)
    a.jeq32(regs[3], w[3], target)
    a.label(miss)


def _jmapped(a: Asm, regs: Sequence[int], otherwise: str) -> None:
    """Fall through if REGS hold ::ffff:a.b.c.d (the IPv4 part in regs[3]), else jump."""
    a.jne32(regs[0], 0, otherwise)
    a.jne32(regs[1], 0, otherwise)
    a.jne32(regs[2], MAPPED_PREFIX, otherwise)


def _load4(a: Asm, base: int, off: int, first: int = R2) -> list[int]:
    regs = [first, first + 1, first + 2, first + 3]
    for i, reg in enumerate(regs):
        a.ldx(BPF_W, reg, base, off + 4 * i)
    return regs


def _store_ip6(a: Asm, off: int, addr: IPv6Address) -> None:
    """ctx->field[0..3] = ADDR, through R2 (BPF_ST into a ctx is refused)."""
    for i, word in enumerate(words(addr.packed)):
        a.mov32_imm(R2, word)
        a.stx(BPF_W, R6, off + 4 * i, R2)


def _mapped(addr: IPv4Address) -> IPv6Address:
    return IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)


def _bind4(p: AddressPolicy) -> bytes:
    """INET4_BIND: 0.0.0.0 becomes the first address; loopback and the chosen
    addresses (and the broadcast address) pass; anything else: EADDRNOTAVAIL."""
    a = Asm()
    a.mov64_reg(R6, R1)
    a.ldx(BPF_W, R2, R6, SA_USER_IP4)
    a.jeq32(R2, 0, "any")
    a.ldx(BPF_B, R3, R6, SA_USER_IP4)  # first octet, whatever the byte order
    a.jeq32(R3, 127, "allow")
    for addr in p.bindable4():
        a.jeq32(R2, words(addr.packed)[0], "allow")
    a.ja("deny")
    a.label("any")
    if p.ipv4:
        a.mov32_imm(R2, words(p.ipv4[0].packed)[0])
        a.stx(BPF_W, R6, SA_USER_IP4, R2)
        a.ja("allow")
    a.label("deny")
    _deny(a, _errno.EADDRNOTAVAIL)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _bind6(p: AddressPolicy) -> bytes:
    """INET6_BIND: :: becomes the first IPv6 address (or ::ffff:<first IPv4> when
    only IPv4 was chosen, so a dual-stack listener still serves it); ::1, the
    chosen addresses and their v4-mapped forms pass; else EADDRNOTAVAIL."""
    a = Asm()
    a.mov64_reg(R6, R1)
    r = _load4(a, R6, SA_USER_IP6)
    a.jne32(r[0], 0, "not_any")
    a.jne32(r[1], 0, "not_any")
    a.jne32(r[2], 0, "not_any")
    a.jeq32(r[3], 0, "any")
    a.label("not_any")
    _jeq_ip6(a, r, LOOPBACK6, "allow")
    _jmapped(a, r, "native")
    a.jeq32(r[3], 0, "mapped_any")
    a.ldx(BPF_B, R0, R6, SA_USER_IP6 + 12)
    a.jeq32(R0, 127, "allow")
    for addr4 in p.bindable4():
        a.jeq32(r[3], words(addr4.packed)[0], "allow")
    a.ja("deny")
    a.label("mapped_any")
    if p.ipv4:
        a.mov32_imm(R2, words(p.ipv4[0].packed)[0])
        a.stx(BPF_W, R6, SA_USER_IP6 + 12, R2)
        a.ja("allow")
    else:
        a.ja("deny")
    a.label("native")
    for addr6 in p.ipv6:
        _jeq_ip6(a, r, addr6, "allow")
    a.ja("deny")
    a.label("any")
    if p.ipv6:
        _store_ip6(a, SA_USER_IP6, p.ipv6[0])
        a.ja("allow")
    elif p.ipv4:
        _store_ip6(a, SA_USER_IP6, _mapped(p.ipv4[0]))
        a.ja("allow")
    a.label("deny")
    _deny(a, _errno.EADDRNOTAVAIL)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _protocol_check(a: Asm) -> None:
    """Only TCP and UDP are bound before connect; for anything else (SCTP,
    MPTCP, ping sockets) bpf_bind is not known to be safe: refuse (EPERM)."""
    a.ldx(BPF_W, R2, R6, SA_PROTOCOL)
    a.jeq32(R2, IPPROTO_TCP, "proto_ok")
    a.jeq32(R2, IPPROTO_UDP, "proto_ok")
    a.ret(0)
    a.label("proto_ok")


def _bpf_bind(a: Asm, family: int, addr: IPv4Address | IPv6Address) -> None:
    """bpf_bind(ctx, &{family, port 0, addr}, len): the socket gets ADDR as its
    source before the kernel picks one. Port 0 makes the helper use
    BIND_FORCE_ADDRESS_NO_PORT, so the port is still chosen at connect time.
    A failure (say the address is not configured here) fails the connect with
    the helper's errno."""
    size = SOCKADDR_IN_LEN if family == AF_INET else 32  # sockaddr_in6 rounded to 8
    base = -size
    for off in range(base, 0, 8):
        a.st(BPF_DW, R10, off, 0)
    a.st(BPF_H, R10, base, family)  # sa_family, host order; sin_port stays 0
    addr_off = base + (4 if family == AF_INET else 8)  # sin_addr / sin6_addr
    for i, word in enumerate(words(addr.packed)):
        a.st(BPF_W, R10, addr_off + 4 * i, word)
    a.mov64_reg(R1, R6)
    a.mov64_reg(R2, R10)
    a.add64_imm(R2, base)
    a.mov64_imm(R3, SOCKADDR_IN_LEN if family == AF_INET else SOCKADDR_IN6_LEN)
    a.call(BPF_FUNC_bind)
    a.jeq64(R0, 0, "allow")
    a.mov64_reg(R1, R0)
    a.call(BPF_FUNC_set_retval)
    a.ret(0)


def _connect4(p: AddressPolicy) -> bytes:
    """INET4_CONNECT: a socket without a source gets the first address (loopback
    destinations included, as the seed's `chbind --ip eth0 telnet localhost`);
    one already bound must be bound to an allowed address."""
    a = Asm()
    a.mov64_reg(R6, R1)
    _protocol_check(a)
    a.ldx(BPF_DW, R7, R6, SA_SK)
    a.jeq64(R7, 0, "deny")
    a.ldx(BPF_W, R2, R7, SK_SRC_IP4)
    a.jeq32(R2, 0, "unbound")
    a.ldx(BPF_B, R3, R7, SK_SRC_IP4)
    a.jeq32(R3, 127, "allow")
    for addr in p.ipv4:
        a.jeq32(R2, words(addr.packed)[0], "allow")
    a.label("deny")
    _deny(a, _errno.EADDRNOTAVAIL)
    a.label("unbound")
    if p.ipv4:
        _bpf_bind(a, AF_INET, p.ipv4[0])
    else:
        a.ldx(BPF_B, R2, R6, SA_USER_IP4)
        a.jeq32(R2, 127, "allow")
        _deny(a, _errno.ENETUNREACH)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _connect6(p: AddressPolicy) -> bytes:
    """INET6_CONNECT: as _connect4; a v4-mapped destination gets ::ffff:<first IPv4>."""
    a = Asm()
    a.mov64_reg(R6, R1)
    _protocol_check(a)
    a.ldx(BPF_DW, R7, R6, SA_SK)
    a.jeq64(R7, 0, "deny")
    src = _load4(a, R7, SK_SRC_IP6)
    a.jne32(src[0], 0, "bound")
    a.jne32(src[1], 0, "bound")
    a.jne32(src[2], 0, "bound")
    a.jeq32(src[3], 0, "unbound")
    a.label("bound")
    _jeq_ip6(a, src, LOOPBACK6, "allow")
    for addr6 in p.ipv6:
        _jeq_ip6(a, src, addr6, "allow")
    _jmapped(a, src, "deny")
    a.ldx(BPF_B, R0, R7, SK_SRC_IP6 + 12)
    a.jeq32(R0, 127, "allow")
    for addr4 in p.ipv4:
        a.jeq32(src[3], words(addr4.packed)[0], "allow")
    a.label("deny")
    _deny(a, _errno.EADDRNOTAVAIL)
    a.label("unbound")
    dst = _load4(a, R6, SA_USER_IP6)
    _jmapped(a, dst, "native")
    if p.ipv4:
        _bpf_bind(a, AF_INET6, _mapped(p.ipv4[0]))
    else:
        a.ldx(BPF_B, R0, R6, SA_USER_IP6 + 12)
        a.jeq32(R0, 127, "allow")
        _deny(a, _errno.ENETUNREACH)
    a.label("native")
    if p.ipv6:
        _bpf_bind(a, AF_INET6, p.ipv6[0])
    else:
        _jeq_ip6(a, dst, LOOPBACK6, "allow")
        _deny(a, _errno.ENETUNREACH)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _sendmsg4(p: AddressPolicy) -> bytes:
    """UDP4_SENDMSG (unconnected sends; connected ones got their source at
    connect): a source that is unset, or not allowed (say from IP_PKTINFO),
    becomes the first address."""
    a = Asm()
    a.mov64_reg(R6, R1)
    a.ldx(BPF_W, R2, R6, SA_MSG_SRC_IP4)
    a.jeq32(R2, 0, "unset")
    a.ldx(BPF_B, R3, R6, SA_MSG_SRC_IP4)
    a.jeq32(R3, 127, "allow")
    for addr in p.ipv4:
        a.jeq32(R2, words(addr.packed)[0], "allow")
    a.ja("force")
    a.label("unset")
    if not p.ipv4:
        a.ldx(BPF_B, R3, R6, SA_USER_IP4)
        a.jeq32(R3, 127, "allow")
        _deny(a, _errno.ENETUNREACH)
    a.label("force")
    if p.ipv4:
        a.mov32_imm(R2, words(p.ipv4[0].packed)[0])
        a.stx(BPF_W, R6, SA_MSG_SRC_IP4, R2)
        a.ja("allow")
    else:
        _deny(a, _errno.EADDRNOTAVAIL)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _sendmsg6(p: AddressPolicy) -> bytes:
    """UDP6_SENDMSG: as _sendmsg4. (Sends to v4-mapped destinations leave
    through udp_sendmsg and so meet the UDP4_SENDMSG program.)"""
    a = Asm()
    a.mov64_reg(R6, R1)
    src = _load4(a, R6, SA_MSG_SRC_IP6)
    a.jne32(src[0], 0, "set")
    a.jne32(src[1], 0, "set")
    a.jne32(src[2], 0, "set")
    a.jeq32(src[3], 0, "unset")
    a.label("set")
    _jeq_ip6(a, src, LOOPBACK6, "allow")
    for addr6 in p.ipv6:
        _jeq_ip6(a, src, addr6, "allow")
    a.ja("force")
    a.label("unset")
    if not p.ipv6:
        dst = _load4(a, R6, SA_USER_IP6)
        _jeq_ip6(a, dst, LOOPBACK6, "allow")
        _deny(a, _errno.ENETUNREACH)
    a.label("force")
    if p.ipv6:
        _store_ip6(a, SA_MSG_SRC_IP6, p.ipv6[0])
        a.ja("allow")
    else:
        _deny(a, _errno.EADDRNOTAVAIL)
    a.label("allow")
    a.ret(1)
    return a.assemble()


def _sock_create() -> bytes:
    """INET_SOCK_CREATE: no raw IP sockets and no ICMP "ping" sockets. Neither
    passes through the bind/connect/sendmsg hooks that force the source (raw
    and ping sockets have their own bind and sendmsg), so either would let the
    command send from any address of the host. Refused with EPERM."""
    a = Asm()
    a.ldx(BPF_W, R2, R1, SK_TYPE)
    a.jeq32(R2, SOCK_RAW, "deny")
    a.jne32(R2, SOCK_DGRAM, "allow")
    a.ldx(BPF_W, R3, R1, SK_PROTOCOL)
    a.jeq32(R3, IPPROTO_ICMP, "deny")
    a.jeq32(R3, IPPROTO_ICMPV6, "deny")
    a.label("allow")
    a.ret(1)
    a.label("deny")
    a.ret(0)
    return a.assemble()


def address_programs(policy: AddressPolicy) -> list[Program]:
    """The programs that confine a cgroup to POLICY, one per attach point."""
    sa = BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    return [
        Program("vp_sock_create", BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE,
                _sock_create()),
        Program("vp_bind4", sa, BPF_CGROUP_INET4_BIND, _bind4(policy)),
        Program("vp_bind6", sa, BPF_CGROUP_INET6_BIND, _bind6(policy)),
        Program("vp_connect4", sa, BPF_CGROUP_INET4_CONNECT, _connect4(policy)),
        Program("vp_connect6", sa, BPF_CGROUP_INET6_CONNECT, _connect6(policy)),
        Program("vp_sendmsg4", sa, BPF_CGROUP_UDP4_SENDMSG, _sendmsg4(policy)),
        Program("vp_sendmsg6", sa, BPF_CGROUP_UDP6_SENDMSG, _sendmsg6(policy)),
    ]


def confine_cgroup(cgroup_fd: int, policy: AddressPolicy,
                   programs: Iterable[Program] | None = None) -> None:
    """Load every program and attach it to the cgroup v2 directory CGROUP_FD.

    All programs are verified before the first is attached, so a refusal
    leaves the cgroup untouched. The attachments hold the programs: they go
    away when the cgroup is removed.
    """
    progs = list(address_programs(policy) if programs is None else programs)
    fds: list[int] = []
    try:
        for prog in progs:
            fds.append(prog_load(prog.prog_type, prog.insns,
                                 expected_attach_type=prog.attach_type, name=prog.name))
        for prog, fd in zip(progs, fds, strict=True):
            prog_attach(cgroup_fd, fd, prog.attach_type, BPF_F_ALLOW_MULTI)
    finally:
        for fd in fds:
            os.close(fd)
