"""QEMU 11.1 with plain, non-shared guest RAM: the project's NVMe and virtio-blk reach it
through DMA_READ/DMA_WRITE messages only. The guest's own drivers write and read back
checksummed data, make an ext4 file system, check it, and use it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_nvme_guest import BAD_DMESG as NVME_BAD_DMESG

from vfu_guest import GuestKit, VfuDevice, run_guest

MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]
# The NVMe test's list of driver complaints, and virtio-blk's and ext4's.
BAD_DMESG = NVME_BAD_DMESG + r"|virtio.*(error|reset|broken)|I/O error|EXT4-fs error"

SCRIPT = r"""
vfu_wait_dev /dev/nvme0n1 120 || { dmesg | tail -40; exit 10; }
vfu_wait_dev /dev/vda 120 || { dmesg | tail -40; exit 11; }
dd if=/dev/urandom of=/tmp/data bs=4096 count=256 2>/dev/null
echo "data=$(sha256sum < /tmp/data | cut -d' ' -f1)"
mkdir -p /mnt
for dev in nvme0n1 vda; do
    dd if=/tmp/data of=/dev/$dev bs=4096 seek=256 conv=fsync 2>/dev/null || exit 20
    echo 3 > /proc/sys/vm/drop_caches
    echo "${dev}_readback=$(dd if=/dev/$dev bs=4096 skip=256 count=256 2>/dev/null | sha256sum | cut -d' ' -f1)"
    mkfs.ext4 -q -F -E nodiscard /dev/$dev > /tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; exit 21; }
    echo "${dev}_mkfs=ok"
    e2fsck -f -n /dev/$dev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; exit 22; }
    echo "${dev}_fsck=ok"
    mount -t ext4 /dev/$dev /mnt || exit 23
    cp /tmp/data /mnt/file && sync || exit 24
    umount /mnt || exit 25
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro /dev/$dev /mnt || exit 26
    echo "${dev}_file=$(sha256sum < /mnt/file | cut -d' ' -f1)"
    umount /mnt
    e2fsck -f -n /dev/$dev > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; exit 27; }
    echo "${dev}_fsck2=ok"
done
dmesg > /tmp/dmesg
grep -iE '__BAD__' /tmp/dmesg && exit 30
echo dmesg=clean
"""


def e2fsprogs_files() -> dict[str, str]:
    """mkfs.ext4 and e2fsck from the host (e2fsprogs is part of every Debian) with the
    libraries they link beyond the C library, for the guest's initramfs (its kit has none)."""
    out: dict[str, str] = {}
    for name, tool in (("mkfs.ext4", "mke2fs"), ("e2fsck", "e2fsck")):
        path = shutil.which(tool) or shutil.which(tool, path="/sbin:/usr/sbin")
        if path is None:
            pytest.fail(f"{tool} not found on the host (Debian's e2fsprogs)")
        out[f"/usr/sbin/{name}"] = path
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        for lib in re.findall(r"=> (/\S+)", ldd):
            base = os.path.basename(lib)
            if not base.startswith(("libc.so", "ld-linux")):
                out[f"/usr/lib/x86_64-linux-gnu/{base}"] = os.path.realpath(lib)
    return out


@pytest.mark.guest
@pytest.mark.timeout(1000)
def test_nvme_and_virtio_blk_on_plain_guest_ram(guest_kit: GuestKit, tmp_path: Path) -> None:
    nvme_img, blk_img = tmp_path / "nvme.img", tmp_path / "blk.img"
    nvme_img.write_bytes(os.urandom(32 * MIB))
    blk_img.write_bytes(os.urandom(32 * MIB))
    result = run_guest(
        SCRIPT.replace("__BAD__", BAD_DMESG),
        [VfuDevice("nvme", ["--backing", str(nvme_img), "--log-level", "info"], cwd=str(REPO_ROOT)),
         VfuDevice("virtio-blk", ["--backing", str(blk_img), "--log-level", "info"], cwd=str(REPO_ROOT))],
        kit=guest_kit,
        timeout=900,
        shared_ram=False,
        extra_files=e2fsprogs_files(),
    )
    facts = result.values()
    assert "memory-backend-ram" in " ".join(result.qemu_argv)
    assert "memory-backend-memfd" not in " ".join(result.qemu_argv)
    assert facts.get("dmesg") == "clean", result.diagnostics()
    for dev, img in (("nvme0n1", nvme_img), ("vda", blk_img)):
        assert facts[f"{dev}_readback"] == facts["data"], result.diagnostics()
        for step in ("mkfs", "fsck", "fsck2"):
            assert facts.get(f"{dev}_{step}") == "ok", result.diagnostics()
        assert facts[f"{dev}_file"] == facts["data"]
        # The host image holds the ext4 file system the guest made (superblock magic 0xEF53).
        assert img.read_bytes()[1024 + 56 : 1024 + 58] == b"\x53\xef"
    for name, log in result.servers.items():
        # Every byte went through messages: the servers said so once, and nothing else went wrong.
        assert log.stderr.count("guest RAM came without an fd") == 1, f"server {name}:\n{log.stderr}"
        assert "Traceback" not in log.stderr and "controller fatal" not in log.stderr, f"server {name}:\n{log.stderr}"
