"""Fault rules and power loss seen by Linux 6.12 in a QEMU 11.1 guest (docs/faults.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfu_server.guest import GuestKit, VfuDevice, run_guest

MIB = 1 << 20
DISK = 16 * MIB
REPO_ROOT = Path(__file__).resolve().parents[2]


def _nvme(image: Path, *extra: str) -> VfuDevice:
    return VfuDevice("nvme", ["--backing", str(image), "--log-level", "info", *extra], cwd=str(REPO_ROOT))


def _server_ok(result) -> None:  # type: ignore[no-untyped-def]
    for name, log in result.servers.items():
        assert "Traceback" not in log.stderr and "internal error" not in log.stderr, f"server {name}:\n{log.stderr}"


URE = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
rd() { dd if=/dev/nvme0n1 of=/dev/null bs=512 skip=$1 count=${2:-1} iflag=direct 2>/dev/null; }
rd 1000 && echo ure_read=ok || echo ure_read=eio
rd 999 && echo before=ok || echo before=eio
rd 1001 && echo after=ok || echo after=eio
rd 0 800 && echo others=ok || echo others=eio
dd if=/dev/urandom of=/dev/nvme0n1 bs=512 seek=1000 count=1 oflag=direct 2>/dev/null && echo write=ok
rd 1000 && echo ure_again=ok || echo ure_again=eio
dmesg | grep -E 'sct 0x2 / sc 0x81|critical medium error' | sed 's/^/log: /'
"""


@pytest.mark.guest
def test_unrecovered_read_error_on_one_lba(guest_kit: GuestKit, tmp_path: Path) -> None:
    """A read of LBA 1000 fails with Unrecovered Read Error (DNR): the guest gets EIO for that
    block only, the kernel logs the status, the blocks around it and writes are unaffected."""
    image = tmp_path / "nvme.img"
    image.write_bytes(os.urandom(DISK))
    result = run_guest(URE, [_nvme(image, "--fault", "op=read,lba=1000,status=ure,dnr")],
                       kit=guest_kit, timeout=300)
    facts = result.values()
    assert facts.get("ure_read") == "eio", result.output
    assert facts.get("ure_again") == "eio", "the rule has no count: it keeps failing"
    for key in ("before", "after", "others", "write"):
        assert facts.get(key) == "ok", f"{key}: {result.output}"
    logged = "\n".join(line for line in result.output.splitlines() if "log:" in line)
    assert "sct 0x2 / sc 0x81" in logged and "LBA 1000" in logged, result.output
    assert "critical medium error" in logged and "sector 1000" in logged, result.output
    _server_ok(result)


HANG = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
rd() { dd if=/dev/nvme0n1 of=/dev/null bs=512 skip=$1 count=${2:-1} iflag=direct 2>/dev/null; }
rd 2000 && echo held_read=ok || echo held_read=eio
rd 0 64 && echo after_reset=ok || echo after_reset=eio
dd if=/dev/urandom of=/tmp/d bs=4096 count=16 2>/dev/null
dd if=/tmp/d of=/dev/nvme0n1 bs=4096 seek=100 oflag=direct 2>/dev/null && echo write=ok
[ "$(dd if=/dev/nvme0n1 bs=4096 skip=100 count=16 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum < /tmp/d)" ] && echo readback=ok
dmesg | grep -iE 'nvme.*(timeout|abort|reset)' | sed 's/^/log: /'
"""


@pytest.mark.guest
def test_never_completed_command_drives_timeout_abort_and_reset(guest_kit: GuestKit, tmp_path: Path) -> None:
    """One read is never completed: the Linux nvme driver times it out (io_timeout=4 s), sends
    an Abort (which the controller does not carry out), times it out again, resets the
    controller (the reset drops the held command), retries the read and carries on."""
    image = tmp_path / "nvme.img"
    image.write_bytes(os.urandom(DISK))
    result = run_guest(HANG, [_nvme(image, "--fault", "op=read,lba=2000,count=1,hang")], kit=guest_kit,
                       timeout=300, append="nvme_core.io_timeout=4")
    facts = result.values()
    for key in ("held_read", "after_reset", "write", "readback"):
        assert facts.get(key) == "ok", f"{key}: {result.output}"
    logged = "\n".join(line for line in result.output.splitlines() if "log:" in line)
    assert "timeout, aborting" in logged, result.output
    assert "Abort status" in logged, result.output
    assert "timeout, reset controller" in logged, result.output
    server = result.servers["vu0"].stderr
    assert "fault rule 1 (hang)" in server, server
    _server_ok(result)


VIRTIO_IOERR = r"""
vfu_wait_dev /dev/vda 30 || exit 10
echo "lbs=$(cat /sys/block/vda/queue/logical_block_size)"
rd() { dd if=/dev/vda of=/dev/null bs=4096 skip=$1 count=${2:-1} iflag=direct 2>/dev/null; }
rd 37 && echo ioerr_read=ok || echo ioerr_read=eio
rd 38 && echo next=ok || echo next=eio
rd 0 16 && echo others=ok || echo others=eio
dd if=/dev/zero of=/dev/vda bs=4096 seek=112 count=1 oflag=direct conv=fsync 2>/dev/null && echo write=ok || echo write=eio
dmesg | grep -E 'I/O error.*vda' | sed 's/^/log: /'
"""


@pytest.mark.guest
def test_virtio_blk_ioerr_reaches_the_guest(guest_kit: GuestKit, tmp_path: Path) -> None:
    """VIRTIO_BLK_S_IOERR for reads of sectors 296-303 (4 KiB page 37) and writes of sectors
    896-903 (page 112): the guest's virtio_blk driver turns each into an I/O error for that
    request only."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(DISK))
    device = VfuDevice("virtio-blk", ["--backing", str(image), "--log-level", "info",
                                      "--fault", "op=read,lba=296-303,status=ioerr",
                                      "--fault", "op=write,lba=896-903,status=ioerr"], cwd=str(REPO_ROOT))
    result = run_guest(VIRTIO_IOERR, [device], kit=guest_kit, timeout=300)
    facts = result.values()
    assert facts.get("ioerr_read") == "eio" and facts.get("write") == "eio", result.output
    assert facts.get("next") == "ok" and facts.get("others") == "ok", result.output
    logged = "\n".join(line for line in result.output.splitlines() if "log:" in line)
    assert "sector 296 op 0x0:(READ)" in logged and "sector 896 op 0x1:(WRITE)" in logged, result.output
    _server_ok(result)
