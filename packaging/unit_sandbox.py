#!/usr/bin/env python3
"""Run a command under the seccomp filters of a systemd unit, without systemd.

    python3 packaging/unit_sandbox.py [--unit FILE] [--check] [-- COMMAND [ARG...]]

Where systemd is not PID 1 (containers, CI), this is how the package tests run the installed
agent and its proxies under the unit's system call restrictions. It reads these directives of
the unit (default: systemd/iotunnel-agent.service next to this directory) and installs what
systemd would install for them (src/shared/seccomp-util.c), as one filter:

- ``SystemCallArchitectures=native``: system calls of other ABIs (x32 included) fail;
- ``MemoryDenyWriteExecute=yes``: ``mmap`` with ``PROT_WRITE|PROT_EXEC``, ``mprotect`` and
  ``pkey_mprotect`` with ``PROT_EXEC``, ``shmat`` with ``SHM_EXEC`` fail with EPERM;
- ``RestrictAddressFamilies=``: ``socket()`` of another family fails with EAFNOSUPPORT;
- ``SystemCallFilter=``: the groups are expanded by ``systemd-analyze syscall-filter`` (an allow
  list gets ``@default`` first, as systemd adds it), numbered from the kernel headers
  (linux-libc-dev), and every other system call fails with ``SystemCallErrorNumber=`` (or
  kills the process, systemd's default);
- ``NoNewPrivileges=yes`` (also required for an unprivileged seccomp filter).

Then it checks the filter (a W+X mapping is refused, when MDWE is on) and execs COMMAND, whose
children inherit the filter. ``--check`` only installs and checks. Linux x86-64 and arm64.
Not emulated: the namespaces and mounts (ProtectSystem=, PrivateTmp=, ...), capabilities,
users, LockPersonality=, RestrictNamespaces=, RestrictRealtime=, RestrictSUIDSGID=.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import platform
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "iotunnel-agent.service"

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000
SHM_EXEC = 0o100000
X32_SYSCALL_BIT = 0x40000000

# BPF opcodes
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
NR, ARCH = 0, 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (little-endian machines)."""
    return 16 + 8 * index


#: machine -> (AUDIT_ARCH_*, kernel header with the system call numbers)
MACHINES = {
    "x86_64": (0xC000003E, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": (0xC00000B7, "/usr/include/asm-generic/unistd.h"),
}


class SandboxError(Exception):
    """The filter cannot be built or installed here."""


@dataclass
class Settings:
    """The unit's directives that become seccomp rules."""

    memory_deny_write_execute: bool = False
    no_new_privileges: bool = False
    native_only: bool = False
    address_families: set[str] | None = None  # None: unrestricted
    syscall_allow: bool | None = None  # None: no SystemCallFilter=
    syscall_entries: list[tuple[bool, str]] = field(default_factory=list)  # (deny, name)
    error_number: str | None = None


def _yes(value: str) -> bool:
    return value.strip().lower() in ("1", "yes", "true", "on")


def read_unit(path: Path) -> Settings:
    """The [Service] directives that matter here, with systemd's assignment rules (an empty
    assignment resets a list; ``~`` makes an assignment a deny list)."""
    settings = Settings()
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]":
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        if key == "MemoryDenyWriteExecute":
            settings.memory_deny_write_execute = _yes(value)
        elif key == "NoNewPrivileges":
            settings.no_new_privileges = _yes(value)
        elif key == "SystemCallArchitectures":
            settings.native_only = value.split() == ["native"]
        elif key == "SystemCallErrorNumber":
            settings.error_number = value or None
        elif key == "RestrictAddressFamilies":
            if not value:
                settings.address_families = None
            elif value.startswith("~"):
                raise SandboxError("RestrictAddressFamilies=~ (a deny list) is not supported")
            else:
                settings.address_families = (settings.address_families or set()) | set(
                    value.split()
                )
        elif key == "SystemCallFilter":
            if not value:
                settings.syscall_allow, settings.syscall_entries = None, []
                continue
            deny = value.startswith("~")
            if settings.syscall_allow is None:
                settings.syscall_allow = not deny
            names = value.removeprefix("~").split()
            settings.syscall_entries += [(deny, name) for name in names]
    return settings


@functools.cache
def _group(name: str) -> frozenset[str]:
    """The system calls of a ``@group``, expanded recursively by systemd-analyze."""
    try:
        done = subprocess.run(
            ["systemd-analyze", "syscall-filter", "--no-pager", name],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SandboxError(f"systemd-analyze syscall-filter {name}: {exc}") from None
    members: set[str] = set()
    for line in done.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        members |= _group(item) if item.startswith("@") else {item}
    return frozenset(members)


def _expand(name: str) -> frozenset[str]:
    return _group(name) if name.startswith("@") else frozenset([name])


def allowed_syscalls(settings: Settings) -> set[str] | None:
    """The names SystemCallFilter= allows, or None when it is not an allow list."""
    if settings.syscall_allow is None:
        return None
    if not settings.syscall_allow:
        raise SandboxError("SystemCallFilter= that starts as a deny list is not supported")
    allowed = set(_group("@default"))
    for deny, name in settings.syscall_entries:
        if deny:
            allowed -= _expand(name)
        else:
            allowed |= _expand(name)
    return allowed


def syscall_numbers(header: str) -> dict[str, int]:
    """``name -> number`` from the kernel's unistd header."""
    try:
        text = Path(header).read_text()
    except OSError:
        raise SandboxError(f"no {header}: apt-get install linux-libc-dev") from None
    numbers = {m[0]: int(m[1]) for m in re.findall(r"#define __NR3?2?6?4?_(\w+)\s+(\d+)\b", text)}
    for name, alias in re.findall(r"#define __NR_(\w+)\s+__NR3264_(\w+)", text):
        if alias in numbers:
            numbers[name] = numbers[alias]
    return numbers


class _Program:
    """A BPF assembler with forward labels (jumps are 8-bit: keep them short)."""

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
            offsets = [self.labels[j] - index - 1 if isinstance(j, str) else j for j in (jt, jf)]
            if not all(0 <= offset <= 255 for offset in offsets):
                raise SandboxError(f"BPF jump out of range at {index}")
            out += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
        return out


def _errno(name: str) -> int:
    value = getattr(errno, name, None)
    if not isinstance(value, int):
        raise SandboxError(f"unknown errno {name}")
    return value


def _family(name: str) -> int:
    value = getattr(socket, name, None)
    if not isinstance(value, int):
        raise SandboxError(f"unknown address family {name}")
    return int(value)


def filter_program(settings: Settings, machine: str) -> bytes:
    """The seccomp program for ``settings`` on ``machine``."""
    audit_arch, header = MACHINES[machine]
    numbers = syscall_numbers(header)
    deny_action = (
        RET_ERRNO | _errno(settings.error_number) if settings.error_number else RET_KILL_PROCESS
    )
    eperm = RET_ERRNO | errno.EPERM
    p = _Program()
    p.op(LD_W_ABS, ARCH)
    if settings.native_only or settings.syscall_allow is not None:
        p.op(JEQ_K, audit_arch, 1, 0)
        p.op(RET_K, deny_action)
    else:
        p.op(JEQ_K, audit_arch, 1, 0)
        p.op(RET_K, RET_ALLOW)  # a foreign ABI: out of scope
    p.op(LD_W_ABS, NR)
    if machine == "x86_64" and (settings.native_only or settings.syscall_allow is not None):
        p.op(JGE_K, X32_SYSCALL_BIT, 0, 1)
        p.op(RET_K, deny_action)
    block = 0

    def arg_check(syscall: str, index: int, mask: int, action: int) -> None:
        """If ``syscall`` has all ``mask`` bits in argument ``index``: return ``action``."""
        nonlocal block
        if syscall not in numbers:
            return
        block += 1
        p.op(JEQ_K, numbers[syscall], 0, f"skip{block}")
        p.op(LD_W_ABS, arg_low(index))
        p.op(AND_K, mask)
        p.op(JEQ_K, mask, 0, f"restore{block}")
        p.op(RET_K, action)
        p.label(f"restore{block}")
        p.op(LD_W_ABS, NR)
        p.label(f"skip{block}")

    if settings.memory_deny_write_execute:
        arg_check("mmap", 2, mmap.PROT_WRITE | mmap.PROT_EXEC, eperm)
        arg_check("mprotect", 2, mmap.PROT_EXEC, eperm)
        arg_check("pkey_mprotect", 2, mmap.PROT_EXEC, eperm)
        arg_check("shmat", 2, SHM_EXEC, eperm)
    if settings.address_families is not None:
        families = sorted({_family(name) for name in settings.address_families})
        p.op(JEQ_K, numbers["socket"], 0, "families-done")
        p.op(LD_W_ABS, arg_low(0))
        for family in families:
            p.op(JEQ_K, family, "family-ok", 0)
        p.op(RET_K, RET_ERRNO | errno.EAFNOSUPPORT)
        p.label("family-ok")
        p.op(LD_W_ABS, NR)
        p.label("families-done")
    allowed = allowed_syscalls(settings)
    if allowed is None:
        p.op(RET_K, RET_ALLOW)
    else:
        for number in sorted({numbers[name] for name in allowed if name in numbers}):
            p.op(JEQ_K, number, 0, 1)
            p.op(RET_K, RET_ALLOW)
        p.op(RET_K, deny_action)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def install(settings: Settings) -> None:
    """Install the filter on this process (and so on everything it execs)."""
    machine = platform.machine()
    if machine not in MACHINES:
        raise SandboxError(f"{machine} is not supported ({', '.join(MACHINES)})")
    program = filter_program(settings, machine)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = _libc()
    # systemd sets it with NoNewPrivileges=yes, and for any filter of an unprivileged unit.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def write_execute_refused() -> bool:
    """Whether this process may no longer map memory writable and executable."""
    try:
        area = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        return True
    area.close()
    return False


def self_check(settings: Settings) -> list[str]:
    """What the installed filter does, as checked from inside it; raises if it does not."""
    report = []
    if settings.memory_deny_write_execute:
        if not write_execute_refused():
            raise SandboxError("a writable and executable mapping was not refused")
        report.append("W+X mappings are refused (EPERM)")
    if settings.address_families is not None and "AF_NETLINK" not in settings.address_families:
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                raise
            report.append("AF_NETLINK sockets are refused (EAFNOSUPPORT)")
        else:
            raise SandboxError("an AF_NETLINK socket was not refused")
    allowed = allowed_syscalls(settings)
    if allowed is not None and "setuid" not in allowed and settings.error_number:
        try:
            os.setuid(os.getuid())
        except PermissionError:
            report.append("setuid() is refused (EPERM)")
        else:
            raise SandboxError("setuid() was not refused")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1].strip()
    )
    parser.add_argument("--unit", type=Path, default=DEFAULT_UNIT, help="the systemd unit")
    parser.add_argument("--check", action="store_true", help="install, check, print, exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.check and not command:
        parser.error("no command")
    try:
        settings = read_unit(args.unit)
        install(settings)
        report = self_check(settings)
    except SandboxError as exc:
        print(f"unit_sandbox: {exc}", file=sys.stderr)
        return 1
    if args.check:
        print(f"unit_sandbox: {args.unit.name}: " + "; ".join(report or ["no restrictions"]))
        return 0
    os.execvp(command[0], command)  # noqa: S606 - replacing this process is the point
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
