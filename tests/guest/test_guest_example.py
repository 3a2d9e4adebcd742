"""The example device (devices/example.py) served over vfio-user to QEMU 11.1 and seen by Linux."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfu_server.guest import GuestError, GuestKit, VfuDevice, run_guest
from vfu_server.guest.checks import EXAMPLE_APPEND, EXAMPLE_SCRIPT, check_example


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
