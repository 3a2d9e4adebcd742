"""The example device (devices/example.py) served over vfio-user to QEMU 11.1 and seen by Linux."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfu_guest import GuestError, GuestKit, VfuDevice, run_guest
from vfu_guest.checks import EXAMPLE_APPEND, EXAMPLE_SCRIPT, check_example


@pytest.mark.guest
def test_example_device_seen_by_guest(guest_kit: GuestKit) -> None:
    result = run_guest(EXAMPLE_SCRIPT, [VfuDevice("example")], kit=guest_kit, append=EXAMPLE_APPEND)
    check_example(result.values())
    result.assert_no_qemu_warnings()


@pytest.mark.guest
def test_wrong_magic_is_caught(guest_kit: GuestKit, repo_root: Path) -> None:
    device = VfuDevice("tests.guest.broken_devices:WrongMagic", cwd=repo_root)
    result = run_guest(EXAMPLE_SCRIPT, [device], kit=guest_kit, append=EXAMPLE_APPEND)
    with pytest.raises(AssertionError, match=r"magic: guest saw 0x56465531, expected 0x56465530"):
        check_example(result.values())


@pytest.mark.guest
def test_server_start_failure_is_reported_and_cleaned_up(
    guest_kit: GuestKit, repo_root: Path
) -> None:
    devices = [
        VfuDevice("example"),
        VfuDevice("tests.guest.broken_devices:CrashesOnStart", cwd=repo_root),
    ]
    with pytest.raises(GuestError, match=r"vu1 .* before listening") as info:
        run_guest("true", devices, kit=guest_kit)
    assert "CrashesOnStart: refusing to start" in str(info.value)
    result = info.value.result
    assert result is not None and result.qemu_returncode is None
    # The server that did start was stopped again.
    assert result.servers["vu0"].returncode is not None


SIGTERMED = """
from vfu_guest import VfuDevice, run_guest
run_guest("echo booted-and-waiting; sleep 600", [VfuDevice("example")], timeout=700)
"""


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:160]}")
    return found


@pytest.mark.guest
def test_sigterm_stops_qemu_and_the_servers(guest_kit: GuestKit, repo_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH")) if p)}
    env.pop("VFU_KEEP_GUEST_TMP", None)
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED], env=env, cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not any("booted-and-waiting" in p.read_text(errors="replace")
                      for p in tmp_path.glob("vfu-guest-*/serial.log")):
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            assert time.monotonic() < deadline, "the guest did not boot"
            time.sleep(0.2)
        assert len(_processes_mentioning(str(tmp_path))) >= 2  # QEMU and the server
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while (left := _processes_mentioning(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    assert list(tmp_path.glob("vfu-guest-*")) == []


def test_check_example_reports_every_difference() -> None:
    good = {
        "vendor": "0x1234", "device": "0xfe01", "class": "0xff0000", "subsystem_vendor": "0x1234",
        "subsystem_device": "0x0001", "magic": "0x56465530", "scratch": "0xCAFEF00D",
        "scratch2": "0x12345678", "magic_after_write": "0x56465530", "status": "0x00000001",
        "irq_count": "0x00000001",
        "dma_dst": "0x11223344,0x55667788,0x99AABBCC,0xDDEEFF00",
    }  # fmt: skip
    check_example(good)
    bad = {**good, "scratch": "0x00000000", "dma_dst": "0x0,0x0,0x0,0x0"}
    del bad["vendor"]
    with pytest.raises(AssertionError) as info:
        check_example(bad)
    text = str(info.value)
    assert "vendor: not reported" in text
    assert "scratch: guest saw 0x0, expected 0xcafef00d" in text
    assert "dma_dst: guest saw 0x00000000" in text
