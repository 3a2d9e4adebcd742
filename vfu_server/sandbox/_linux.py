"""The few Linux system calls the sandbox makes, through ctypes on the C library.

No third-party binding: ``syscall(2)`` and ``prctl(2)`` are all that is needed, and the
numbers are those of x86-64 (:data:`SUPPORTED`), the one architecture the seccomp filter
is written for.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

SUPPORTED = platform.machine() == "x86_64"

# x86-64 system call numbers used to set the sandbox up (the filter's own list is in seccomp.py).
NR_CAPSET = 126
NR_SECCOMP = 317
NR_LANDLOCK_CREATE_RULESET = 444
NR_LANDLOCK_ADD_RULE = 445
NR_LANDLOCK_RESTRICT_SELF = 446

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.restype = ctypes.c_int
    return _libc


def syscall(nr: int, *args: Any) -> int:
    """``syscall(nr, *args)``; raises OSError with the errno on -1."""
    rc = libc().syscall(ctypes.c_long(nr), *args)
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc = libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4),
                      ctypes.c_ulong(arg5))
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc)


def set_no_new_privs() -> None:
    """This thread (and what it starts) can never gain privileges through execve again."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_VERSION_3 = 0x20080522


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_capabilities() -> None:
    """Empty this thread's bounding, ambient, effective, permitted and inheritable sets.

    Per thread, as capabilities are: the caller runs it in every thread that exists.
    """
    for cap in range(last_cap() + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break  # EPERM without CAP_SETPCAP (nothing to drop then), EINVAL past the last
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass  # kernels before 4.3 have no ambient set
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    syscall(NR_CAPSET, ctypes.byref(header), ctypes.byref(data))


def effective_capabilities() -> int:
    """CapEff of this thread, from /proc (0 when unreadable)."""
    try:
        with open(f"/proc/self/task/{os_gettid()}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def os_gettid() -> int:
    import threading

    return threading.get_native_id()
