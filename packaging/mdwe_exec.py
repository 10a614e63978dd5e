#!/usr/bin/env python3
"""Run a command under systemd's ``MemoryDenyWriteExecute=yes`` filter, without systemd.

    python3 packaging/mdwe_exec.py [--check] -- COMMAND [ARG...]

systemd implements ``MemoryDenyWriteExecute=yes`` as a seccomp filter (``seccomp-util.c``,
``seccomp_memory_deny_write_execute``) that fails with EPERM:

- ``mmap`` with both ``PROT_WRITE`` and ``PROT_EXEC``,
- ``mprotect`` and ``pkey_mprotect`` with ``PROT_EXEC``,
- ``shmat`` with ``SHM_EXEC``.

This installs the same rules (and, like ``SystemCallArchitectures=native``, refuses system
calls of other ABIs), sets ``no_new_privs`` as systemd does for it, checks that a writable and
executable mapping is now refused, and then execs COMMAND, whose children inherit the filter.
Linux on x86-64 and arm64 only. ``--check`` runs only the self-check.

This is how the package tests show that the vendored native code (awscrt, protobuf's upb,
websockets' and uvloop's extensions) runs with the unit's MemoryDenyWriteExecute=yes on a
machine where systemd is not PID 1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import struct
import sys
from collections.abc import Sequence

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SHM_EXEC = 0o100000
X32_SYSCALL_BIT = 0x40000000

# BPF opcodes
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
NR, ARCH, ARG2_LOW = 0, 4, 16 + 2 * 8

#: machine -> (AUDIT_ARCH_*, {syscall: number})
ARCHES = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "shmat": 30, "pkey_mprotect": 329}),
    "aarch64": (0xC00000B7, {"mmap": 222, "mprotect": 226, "shmat": 196, "pkey_mprotect": 288}),
}


class _Program:
    """A tiny BPF assembler with forward labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = b""
        for index, (code, jt, jf, k) in enumerate(self.code):
            offsets = [
                self.labels[j] - index - 1 if isinstance(j, str) else j for j in (jt, jf)
            ]
            out += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
        return out


def filter_program(machine: str) -> bytes:
    """The seccomp program of MemoryDenyWriteExecute=yes for ``machine``."""
    audit_arch, numbers = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    p = _Program()
    p.op(LD_W_ABS, ARCH)
    p.op(JEQ_K, audit_arch, 0, "deny")
    p.op(LD_W_ABS, NR)
    p.op(JGE_K, X32_SYSCALL_BIT, "deny", 0)
    p.op(JEQ_K, numbers["mmap"], "mmap", 0)
    p.op(JEQ_K, numbers["mprotect"], "mprotect", 0)
    p.op(JEQ_K, numbers["pkey_mprotect"], "mprotect", 0)
    p.op(JEQ_K, numbers["shmat"], "shmat", 0)
    p.op(RET_K, SECCOMP_RET_ALLOW)
    for name, mask in (
        ("mmap", mmap.PROT_WRITE | mmap.PROT_EXEC),
        ("mprotect", mmap.PROT_EXEC),
        ("shmat", SHM_EXEC),
    ):
        p.label(name)
        p.op(LD_W_ABS, ARG2_LOW)
        p.op(AND_K, mask)
        p.op(JEQ_K, mask, "deny", 0)
        p.op(RET_K, SECCOMP_RET_ALLOW)
    p.label("deny")
    p.op(RET_K, deny)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install the filter on this process (and so on everything it execs)."""
    machine = platform.machine()
    if machine not in ARCHES:
        raise SystemExit(f"mdwe_exec: {machine} is not supported (x86_64, aarch64)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    program = filter_program(machine)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def write_execute_refused() -> bool:
    """Whether this process may no longer map memory writable and executable."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    address = libc.mmap(None, mmap.PAGESIZE, prot, flags, -1, 0)
    if address not in (None, ctypes.c_void_p(-1).value):
        libc.munmap(ctypes.c_void_p(address), mmap.PAGESIZE)
        return False
    return ctypes.get_errno() == errno.EPERM


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check_only = bool(args) and args[0] == "--check"
    if check_only:
        args = args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not check_only and not args:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    install()
    if not write_execute_refused():
        print("mdwe_exec: the filter did not refuse a W+X mapping", file=sys.stderr)
        return 1
    if check_only:
        print("mdwe_exec: W+X mappings are refused (EPERM)")
        return 0
    os.execvp(args[0], args)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
