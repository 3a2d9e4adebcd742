"""A seccomp filter of our own (classic BPF through ctypes): what a running server never does.

Why a denylist and not an allowlist: the server is CPython, trio, cffi helpers, glibc and an
io_uring backend, and which system calls those make depends on their versions, on lazily
imported modules and on rare paths (an error being formatted, a thread being started for a
slow write). An allowlist that misses one kills or breaks a server in the field on the one
rare path nobody tested, and the project's first rule is that a server never dies. A denylist
of what a device server has no business doing once running (executing programs, starting
processes, debugging others, changing mounts, modules, kernels, privileges or file
ownership, opening sockets nobody asked for) can be kept right by reading it, and what it
does not cover is left to Landlock (files, TCP ports, signals) and to the dropped user.

Why our own BPF and not libseccomp: the filter is ~100 instructions of one shape (compare
the number, compare one argument for ``clone`` and ``socket``); writing them costs less than
a dependency that the virtualenv would have to borrow from the system Python, and it works
with whichever interpreter ``.venv`` was made from.

The filter checks the architecture first and refuses x32 system calls (numbers with bit 30
set), the classic way around an x86-64 denylist.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from . import _linux

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2

CLONE_THREAD = 0x00010000

#: What a running device server never needs (x86-64 numbers). The numbers past 450 are newer
#: than Debian 12's headers, which tests/unit/test_sandbox.py checks the others against.
DENIED: dict[str, int] = {
    # running programs, new processes (clone and clone3 are handled apart: threads stay)
    "execve": 59, "execveat": 322, "fork": 57, "vfork": 58,
    # other processes' memory and file descriptors
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
    "kcmp": 312, "process_madvise": 440,
    # mounts and namespaces
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "open_tree_attr": 467, "unshare": 272, "setns": 308,
    # the kernel itself
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "reboot": 169, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "syslog": 103, "iopl": 172, "ioperm": 173, "swapon": 167,
    "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "lookup_dcookie": 212,
    "vhangup": 153, "uselib": 134, "personality": 135, "nfsservctl": 180,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "sethostname": 170, "setdomainname": 171, "fanotify_init": 300,
    "keyctl": 250, "add_key": 248, "request_key": 249,
    # files by handle (around path checks), ownership and modes (Landlock does not see them)
    "name_to_handle_at": 303, "open_by_handle_at": 304, "mknod": 133, "mknodat": 259,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
    "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463, "removexattrat": 466,
    # privileges: set once at start-up, never again
    "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117,
    "setresgid": 119, "setgroups": 116, "setfsuid": 122, "setfsgid": 123, "capset": 126,
    # new io_uring instances (a ring made at start-up keeps working; its operations are not
    # seen by seccomp, so no new ones)
    "io_uring_setup": 425,
}
NR_CLONE = 56
NR_CLONE3 = 435
NR_SOCKET = 41

# BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_NR = 0  # offsetof(struct seccomp_data, nr)
_ARCH = 4
_ARG0 = 16  # low 32 bits of args[0] (little-endian)


@dataclass(frozen=True)
class Filter:
    program: bytes  # struct sock_filter[]
    rules: int  # system calls with a rule (for the start-up line)
    log_only: bool
    #: A second, unlogged filter: clone3 -> ENOSYS (None in log mode). It is expected at every
    #: thread start, so it must not fill the audit log as the refusals in ``program`` do.
    clone3_program: bytes | None = None


def build(socket_families: Iterable[int] = (), log_only: bool = False) -> Filter:
    """The filter: ``socket()`` only for ``socket_families``, threads but no processes.

    ``log_only``: every refusal becomes SECCOMP_RET_LOG (the kernel's audit log records the
    call and lets it through), which is ``--sandbox log``.
    """
    deny = RET_LOG if log_only else RET_ERRNO | errno.EPERM
    # (code, jt, jf, k) with symbolic jump targets resolved below
    prog: list[tuple[int, object, object, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 0, "deny", AUDIT_ARCH_X86_64),
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE_K, "deny", 0, X32_SYSCALL_BIT),
        (_JEQ_K, "clone", 0, NR_CLONE),
        (_JEQ_K, "socket", 0, NR_SOCKET),
    ]
    for nr in sorted(set(DENIED.values())):
        prog.append((_JEQ_K, "deny", 0, nr))
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(prog)

    label("allow")
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    label("deny")
    prog.append((_RET_K, 0, 0, deny))
    # BPF jumps only forward: the argument checks end in returns of their own.
    label("clone")
    prog.append((_LD_W_ABS, 0, 0, _ARG0))
    prog.append((_JSET_K, 0, 1, CLONE_THREAD))
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    prog.append((_RET_K, 0, 0, deny))
    label("socket")
    prog.append((_LD_W_ABS, 0, 0, _ARG0))
    for family in sorted(set(socket_families)):
        prog.append((_JEQ_K, "socket_ok", 0, family))
    prog.append((_RET_K, 0, 0, deny))
    label("socket_ok")
    prog.append((_RET_K, 0, 0, RET_ALLOW))

    return Filter(_assemble(prog, labels), len(DENIED) + 3, log_only,
                  None if log_only else _assemble(_NO_CLONE3, {}))


# clone3 cannot be checked (its flags are behind a pointer): ENOSYS makes glibc fall back to
# clone, whose flags the filter reads. In log mode clone3 passes unreported (thread starts
# would flood the log), so a process started through it is not seen there.
_NO_CLONE3: list[tuple[int, object, object, int]] = [
    (_LD_W_ABS, 0, 0, _ARCH),
    (_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
    (_LD_W_ABS, 0, 0, _NR),
    (_JEQ_K, 0, 1, NR_CLONE3),
    (_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS),
    (_RET_K, 0, 0, RET_ALLOW),
]


def _assemble(prog: list[tuple[int, object, object, int]], labels: dict[str, int]) -> bytes:
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        offsets = []
        for target in (jt, jf):
            if isinstance(target, str):
                distance = labels[target] - i - 1
                if not 0 <= distance <= 255:
                    raise ValueError(f"seccomp jump to {target} out of range")
                offsets.append(distance)
            else:
                offsets.append(int(target))  # type: ignore[call-overload]
        out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(flt: Filter) -> None:
    """Install ``flt`` in every thread of the process (TSYNC); its refusals go to the kernel's
    audit log as well. The caller has set no_new_privs (TSYNC passes it on to other threads)."""
    if flt.clone3_program is not None:
        _install(flt.clone3_program, SECCOMP_FILTER_FLAG_TSYNC)
    _install(flt.program, SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG)


def _install(program: bytes, flags: int) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    rc = _linux.syscall(_linux.NR_SECCOMP, ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags),
                        ctypes.byref(fprog))
    if rc > 0:
        raise OSError(errno.ESRCH, f"thread {rc} could not take the seccomp filter")


def family_names(families: Iterable[int]) -> list[str]:
    out = []
    for f in sorted(set(families)):
        try:
            out.append(socket.AddressFamily(f).name.removeprefix("AF_"))
        except ValueError:
            out.append(str(f))
    return out
