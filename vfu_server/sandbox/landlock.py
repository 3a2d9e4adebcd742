"""Landlock (Linux 5.13+): the filesystem and TCP ports a running server may still reach.

The ABI is probed at run time and the ruleset handles every right that ABI knows, so that a
right a newer kernel adds is never silently left open by an old rule set: ABI 1 the
filesystem, 2 REFER, 3 TRUNCATE, 4 TCP bind/connect, 5 IOCTL_DEV, 6 signal and
abstract-socket scoping (7 only adds audit flags). Rules apply to files opened afterwards:
descriptors the server opened at start-up (backing files, the TAP, sockets) keep working.

A domain belongs to a thread (``landlock_restrict_self`` has no "all threads" flag before
ABI 8): :func:`restrict_self` is called in every thread that exists, and threads started
later inherit the domain.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass, field

from . import _linux

# enum landlock_rule_type
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_CREATE_RULESET_VERSION = 1

# Filesystem rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13
TRUNCATE = 1 << 14
IOCTL_DEV = 1 << 15

NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

#: Rights that make sense on a regular file (the kernel refuses directory rights there).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ_ONLY = READ_FILE | READ_DIR | EXECUTE


def fs_rights(abi: int) -> int:
    """Every filesystem right ABI ``abi`` knows."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def abi_version() -> int:
    """The kernel's Landlock ABI, or 0 when Landlock is not there (or disabled at boot)."""
    if not _linux.SUPPORTED:
        return 0
    try:
        return _linux.syscall(_linux.NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0  # ENOSYS (no Landlock), EOPNOTSUPP (not enabled at boot)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


@dataclass
class Ruleset:
    """A built, not yet enforced, ruleset: its fd and what it says (for the start-up line)."""

    abi: int
    fd: int
    paths: dict[str, int] = field(default_factory=dict)  # path -> allowed rights
    ports: tuple[int, ...] = ()
    scoped: int = 0

    def restrict_self(self) -> None:
        """Confine the calling thread (it must have no_new_privs)."""
        _linux.syscall(_linux.NR_LANDLOCK_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def build(abi: int, paths: dict[str, int], tcp_connect_ports: tuple[int, ...] = (),
          scoped: int = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) -> Ruleset:
    """A ruleset that handles everything ``abi`` knows and allows ``paths`` (path -> rights;
    directory rights are trimmed for files; missing paths are skipped) and TCP connections to
    ``tcp_connect_ports`` (ABI 4+), scoped to the sandbox for ``scoped`` (ABI 6+)."""
    handled_fs = fs_rights(abi)
    attr = _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        scoped if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _linux.syscall(_linux.NR_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                        ctypes.c_uint32(0))
    ruleset = Ruleset(abi, fd, scoped=attr.scoped)
    try:
        for path, rights in paths.items():
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not there: nothing to allow
            try:
                allowed = rights & handled_fs
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                    allowed &= FILE_RIGHTS
                if not allowed:
                    continue
                rule = _PathBeneathAttr(allowed, pfd)
                _linux.syscall(_linux.NR_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(_RULE_PATH_BENEATH),
                               ctypes.byref(rule), ctypes.c_uint32(0))
                ruleset.paths[path] = allowed
            finally:
                os.close(pfd)
        if abi >= 4:
            for port in sorted(set(tcp_connect_ports)):
                net = _NetPortAttr(NET_CONNECT_TCP, port)
                _linux.syscall(_linux.NR_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(_RULE_NET_PORT),
                               ctypes.byref(net), ctypes.c_uint32(0))
            ruleset.ports = tuple(sorted(set(tcp_connect_ports)))
    except BaseException:
        ruleset.close()
        raise
    return ruleset
