"""The NVMe device under the Linux 6.12 nvme driver and nvme-cli, in a QEMU 11.1 guest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vfu_guest import GuestKit, GuestResult, VfuDevice, run_guest

MIB = 1 << 20
DISK = 32 * MIB
REPO_ROOT = Path(__file__).resolve().parents[2]

# Messages that mean the driver and the device disagree (timeouts, aborts, resets, I/O errors).
BAD_DMESG = (
    r"nvme.*(timeout|abort|will reset|fail|error|bogus|invalid|not ready|is down|I/O)"
    r"|blk_update_request|Buffer I/O error"
)

SCRIPT = r"""
vfu_wait_dev /dev/nvme0n1 30 || { dmesg | tail -40; exit 10; }
PCI=$(basename $(readlink /sys/class/nvme/nvme0/device))
echo "pci=$PCI"
echo "queues=$(ls -d /sys/block/nvme0n1/mq/* | wc -l)"

nvme id-ctrl /dev/nvme0 > /tmp/idctrl && grep -q '^mn *: vfu-server NVMe' /tmp/idctrl && echo id_ctrl=ok
grep -q '^sn *: GUEST0001' /tmp/idctrl && echo serial=ok
nvme id-ns /dev/nvme0n1 > /tmp/idns && grep -q '^nsze *: 0x10000' /tmp/idns && echo id_ns=ok
nvme list | grep -q '/dev/nvme0n1' && echo list=ok
nvme smart-log /dev/nvme0 > /tmp/smart && grep -q 'temperature' /tmp/smart && echo smart=ok
nvme get-feature /dev/nvme0 -f 7 | grep -q 'Current value' && echo feat_queues=ok
nvme get-feature /dev/nvme0 -f 6 | grep -q 'Current value:0x0*1' && echo feat_vwc=ok
nvme get-feature /dev/nvme0 -f 4 > /dev/null && echo feat_temp=ok
nvme error-log /dev/nvme0 > /dev/null && echo error_log=ok
nvme fw-log /dev/nvme0 > /dev/null && echo fw_log=ok
nvme flush /dev/nvme0n1 -n 1 && echo flush=ok
nvme write-zeroes /dev/nvme0n1 -n 1 -s 0 -c 7 && echo write_zeroes=ok
nvme dsm /dev/nvme0n1 -n 1 -s 64 -b 8 -d && echo dsm=ok

# 1 MiB of random data at byte offset 1 MiB, through the page cache, made durable by fsync.
dd if=/dev/urandom of=/tmp/data bs=4096 count=256 2>/dev/null
echo "sha=$(sha256sum /tmp/data | cut -d' ' -f1)"
dd if=/tmp/data of=/dev/nvme0n1 bs=4096 seek=256 conv=fsync 2>/dev/null && echo dd_write=ok
echo 3 > /proc/sys/vm/drop_caches
echo "readback=$(dd if=/dev/nvme0n1 bs=4096 skip=256 count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
nvme smart-log /dev/nvme0 | grep -E 'data_units_written|host_write_commands' | tr -d ' \t' | tr ':' '='

# Unbind and rebind: controller shutdown, reset and re-initialisation, several times.
for i in 1 2 3; do
    echo "$PCI" > /sys/bus/pci/drivers/nvme/unbind || exit 20
    [ -e /dev/nvme0n1 ] && exit 21
    echo "$PCI" > /sys/bus/pci/drivers/nvme/bind || exit 22
    vfu_wait_dev /dev/nvme0n1 30 || exit 23
done
echo rebind=ok
echo 3 > /proc/sys/vm/drop_caches
echo "rebind_readback=$(dd if=/dev/nvme0n1 bs=4096 skip=256 count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
nvme reset /dev/nvme0 && vfu_wait_dev /dev/nvme0n1 30 && echo nvme_reset=ok
dmesg > /tmp/dmesg
grep -iE '__BAD__' /tmp/dmesg && exit 30
echo dmesg=clean
"""

READBACK = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
echo "readback=$(dd if=/dev/nvme0n1 bs=4096 skip=256 count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
dmesg | grep -iE '__BAD__' && exit 30
echo dmesg=clean
"""


def _nvme(image: Path, *extra: str) -> VfuDevice:
    return VfuDevice(
        "nvme",
        ["--backing", str(image), "--serial", "GUEST0001", "--log-level", "info", *extra],
        cwd=str(REPO_ROOT),
    )


def _check(result: GuestResult) -> dict[str, str]:
    facts = result.values()
    if facts.get("dmesg") != "clean":
        raise AssertionError(result.diagnostics())
    for name, log in result.servers.items():
        assert "Traceback" not in log.stderr, f"server {name}:\n{log.stderr}"
        assert "internal error" not in log.stderr and "WARNING" not in log.stderr, (
            f"server {name}:\n{log.stderr}"
        )
    return facts


@pytest.mark.guest
def test_linux_nvme_driver_and_nvme_cli(guest_kit: GuestKit, tmp_path: Path) -> None:
    image = tmp_path / "nvme.img"
    image.write_bytes(os.urandom(DISK))
    result = run_guest(
        SCRIPT.replace("__BAD__", BAD_DMESG),
        [_nvme(image, "--size", str(DISK))],
        kit=guest_kit,
        timeout=300,
        qemu_args=["-smp", "4"],
    )
    facts = _check(result)
    assert facts["queues"] == "4", "one I/O queue per vCPU expected"
    assert "shadow doorbells at" in result.servers["vu0"].stderr, (
        "the driver did not enable shadow doorbells"
    )
    for key in (
        "id_ctrl",
        "serial",
        "id_ns",
        "list",
        "smart",
        "feat_queues",
        "feat_vwc",
        "feat_temp",
        "error_log",
        "fw_log",
        "flush",
        "write_zeroes",
        "dsm",
        "dd_write",
        "rebind",
        "nvme_reset",
    ):
        assert facts.get(key) == "ok", f"{key}: {facts}\n{result.output}"
    disk = image.read_bytes()
    assert disk[: 8 * 512] == bytes(8 * 512), "write-zeroes did not reach the backing file"
    assert disk[64 * 512 : 72 * 512] == bytes(8 * 512), (
        "dsm deallocate did not reach the backing file"
    )
    written = hashlib.sha256(disk[MIB : 2 * MIB]).hexdigest()
    assert facts["sha"] == written, "data written by the guest is not in the backing file"
    assert facts["readback"] == written
    assert facts["rebind_readback"] == written
    assert int(facts["host_write_commands"].replace(",", "")) > 0

    # A new server process on the same file: the data is still there for a new guest.
    again = run_guest(
        READBACK.replace("__BAD__", BAD_DMESG), [_nvme(image)], kit=guest_kit, timeout=300
    )
    assert _check(again)["readback"] == written
