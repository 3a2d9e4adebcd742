"""The sandbox's seccomp program and Landlock rights, checked without applying them (the
integration tests apply them to real servers)."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_server import sandbox
from vfu_server.sandbox import landlock, seccomp

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not HEADER.exists(), reason="no kernel headers (linux-libc-dev)")
def test_system_call_numbers_match_the_kernel_headers():
    known = dict(re.findall(r"#define __NR_(\w+) (\d+)", HEADER.read_text()))
    checked = 0
    for name, nr in {**seccomp.DENIED, "clone": seccomp.NR_CLONE, "clone3": seccomp.NR_CLONE3,
                     "socket": seccomp.NR_SOCKET}.items():
        if name in known:  # the newest ones are past these headers
            assert int(known[name]) == nr, name
            checked += 1
    assert checked >= len(seccomp.DENIED) - 5


def run_bpf(program: bytes, arch: int, nr: int, arg0: int) -> int:
    """A classic-BPF interpreter for the instructions the filter uses, over a seccomp_data."""
    data = struct.pack("<IIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):
            taken = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


FAMILIES = st.frozensets(st.sampled_from([1, 2, 10, 16, 17]))
NUMBERS = st.one_of(st.integers(0, 480), st.sampled_from(sorted(seccomp.DENIED.values())),
                    st.integers(0, 2**32 - 1))


@given(FAMILIES, NUMBERS, st.integers(0, 2**32 - 1), st.sampled_from([seccomp.AUDIT_ARCH_X86_64, 0x40000003]),
       st.booleans())
def test_the_filter_decides_what_the_policy_says(families, nr, arg0, arch, log_only):
    flt = seccomp.build(families, log_only=log_only)
    deny = seccomp.RET_LOG if log_only else seccomp.RET_ERRNO | errno.EPERM
    if arch != seccomp.AUDIT_ARCH_X86_64 or nr >= seccomp.X32_SYSCALL_BIT or nr in seccomp.DENIED.values():
        want = deny
    elif nr == seccomp.NR_CLONE:
        want = seccomp.RET_ALLOW if arg0 & seccomp.CLONE_THREAD else deny
    elif nr == seccomp.NR_CLONE3:
        want = seccomp.RET_ALLOW if log_only else seccomp.RET_ERRNO | errno.ENOSYS
    elif nr == seccomp.NR_SOCKET:
        want = seccomp.RET_ALLOW if arg0 in families else deny
    else:
        want = seccomp.RET_ALLOW
    got = run_bpf(flt.program, arch, nr, arg0)
    if got == seccomp.RET_ALLOW and flt.clone3_program is not None:  # the stricter filter wins
        got = run_bpf(flt.clone3_program, arch, nr, arg0)
    assert got == want


def test_landlock_rights_follow_the_abi():
    assert landlock.fs_rights(1) == (1 << 13) - 1
    assert landlock.fs_rights(2) & landlock.REFER and not landlock.fs_rights(2) & landlock.TRUNCATE
    assert landlock.fs_rights(3) & landlock.TRUNCATE and not landlock.fs_rights(4) & landlock.IOCTL_DEV
    assert landlock.fs_rights(7) == (1 << 16) - 1


def test_explicit_on_is_refused_where_landlock_is_missing(monkeypatch):
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    with pytest.raises(sandbox.SandboxError, match="no Landlock"):
        sandbox.configure("on")
    cfg = sandbox.configure(None)  # the default leaves Landlock out and says so
    assert cfg.mode == "on" and not cfg.explicit and cfg.landlock_abi == 0


def test_needs_combine():
    a = sandbox.SandboxNeeds.unix_connect() | sandbox.SandboxNeeds.removes("/run/vfu/x.sock")
    b = sandbox.SandboxNeeds.union([a, sandbox.SandboxNeeds.tcp_connect(10809)])
    assert a.remove_in == {"/run/vfu"}
    assert 10809 in b.tcp_connect_ports and 1 in b.socket_families and "/etc/hosts" in b.read_paths


def test_code_paths_never_open_the_whole_disk():
    paths = sandbox.code_paths()
    assert paths and all(p.count("/") >= 2 for p in paths)
    assert any(Path(p, "vfu_server").is_dir() or p.endswith("vfu_server") for p in paths)
