"""virtio-blk and virtio-rng served by vfu-server, driven by the Linux guest's own drivers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vfu_guest import GuestKit, VfuDevice, run_guest

MIB = 1 << 20

SCRIPT = r"""
vfu_wait_dev /dev/vda || exit 10
echo "size=$(cat /sys/block/vda/size)"
echo "serial=$(cat /sys/block/vda/serial)"
echo "mq=$(ls /sys/block/vda/mq | wc -l)"
echo "discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)"
echo "head=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
echo "data=$(sha256sum < /tmp/data | cut -d' ' -f1)"
dd if=/tmp/data of=/dev/vda bs=1M seek=2 conv=fsync 2>/dev/null || exit 11
echo 3 > /proc/sys/vm/drop_caches
echo "readback=$(dd if=/dev/vda bs=1M skip=2 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
blkdiscard -o 8388608 -l 1048576 /dev/vda && echo discard=ok
sync
vfu_wait_dev /dev/hwrng || exit 12
echo "rng_current=$(cat /sys/class/misc/hw_random/rng_current)"
echo "rng1=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
echo "rng2=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
"""


@pytest.mark.guest
def test_guest_virtio_blk_and_rng(guest_kit: GuestKit, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(16 * MIB))
    before = img.read_bytes()
    result = run_guest(
        SCRIPT,
        [VfuDevice("virtio-blk", ["--backing", str(img), "--serial", "vfu-guest-disk", "--num-queues", "2"]),
         VfuDevice("virtio-rng")],
        kit=guest_kit,
        timeout=240,
    )
    facts = result.values()
    assert facts["size"] == str(16 * MIB // 512)
    assert facts["serial"] == "vfu-guest-disk"
    assert int(facts["mq"]) >= 1
    assert int(facts["discard_max"]) > 0
    assert facts["head"] == hashlib.sha256(before[:MIB]).hexdigest()
    assert facts["readback"] == facts["data"]
    after = img.read_bytes()
    assert hashlib.sha256(after[2 * MIB : 6 * MIB]).hexdigest() == facts["data"]
    assert facts.get("discard") == "ok"
    assert after[8 * MIB : 9 * MIB] == bytes(MIB)
    assert after[9 * MIB :] == before[9 * MIB :]
    assert facts["rng_current"].startswith("virtio_rng")
    assert len(facts["rng1"]) == 64 and facts["rng1"] != facts["rng2"]
    result.assert_no_qemu_warnings()
