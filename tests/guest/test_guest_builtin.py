"""The harness and the guest with QEMU's own devices only (no project code in the data path).

If these fail, the problem is provisioning, the guest or the runner, not a vfio-user device.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vfu_guest import (
    GuestError,
    GuestKit,
    builtin_nvme,
    builtin_virtio_blk,
    builtin_virtio_net,
    run_guest,
    run_guest_async,
)

MIB = 1 << 20

SCRIPT = r"""
vfu_wait_dev /dev/nvme0n1 || exit 10
vfu_wait_dev /dev/vda || exit 11
echo "nvme_head=$(head -c 16 /dev/nvme0n1)"
echo "vda_head=$(head -c 16 /dev/vda)"
echo "nvme_model=$(cat /sys/class/nvme/nvme0/model | tr -d ' ')"
nvme id-ctrl /dev/nvme0 | grep -q '^mn *: QEMU NVMe Ctrl' && echo nvme_cli=ok
printf 'GUEST-WROTE-NVME' | dd of=/dev/nvme0n1 bs=512 seek=8 conv=fsync 2>/dev/null
printf 'GUEST-WROTE-VDA.' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
ping -c 1 -W 5 10.0.2.2 > /dev/null && echo ping=ok
"""


@pytest.mark.guest
def test_builtin_nvme_virtio_blk_virtio_net(guest_kit: GuestKit, tmp_path: Path) -> None:
    nvme_img, vblk_img = tmp_path / "nvme.img", tmp_path / "vblk.img"
    for img, head in ((nvme_img, b"NVME-FROM-HOST.."), (vblk_img, b"VBLK-FROM-HOST..")):
        with open(img, "wb") as f:
            f.write(head)
            f.truncate(16 * MIB)
    result = run_guest(
        SCRIPT,
        [builtin_nvme(nvme_img), builtin_virtio_blk(vblk_img), builtin_virtio_net()],
        kit=guest_kit,
    )
    facts = result.values()
    assert facts["nvme_head"] == "NVME-FROM-HOST.."
    assert facts["vda_head"] == "VBLK-FROM-HOST.."
    assert facts["nvme_model"] == "QEMUNVMeCtrl"
    assert facts["nvme_cli"] == "ok"
    assert facts["ping"] == "ok"
    assert nvme_img.read_bytes()[4096:4112] == b"GUEST-WROTE-NVME"
    assert vblk_img.read_bytes()[4096:4112] == b"GUEST-WROTE-VDA."
    result.assert_no_qemu_warnings()


HELLO_C = r"""
#include <stdio.h>
int main(int argc, char **argv) { printf("hello-from=%s argc=%d\n", argv[0], argc); return 0; }
"""


@pytest.mark.guest
def test_extra_files_and_failure_report(guest_kit: GuestKit, tmp_path: Path) -> None:
    # A static tool built on the host joins the guest as an appended initramfs archive (the way
    # the load generator gets in), and a failing script raises with the serial log attached.
    (tmp_path / "hello.c").write_text(HELLO_C)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", tmp_path / "hello", tmp_path / "hello.c"], check=True
    )
    with pytest.raises(GuestError) as info:
        run_guest(
            "/usr/local/bin/hello a b; echo about-to-fail; exit 3",
            kit=guest_kit,
            extra_files={"/usr/local/bin/hello": tmp_path / "hello"},
        )
    result = info.value.result
    assert result is not None and result.rc == 3
    assert result.output == "hello-from=/usr/local/bin/hello argc=3\nabout-to-fail\n"
    assert "| about-to-fail" in str(info.value)
    assert "rc=3" in str(info.value)


@pytest.mark.guest
async def test_timeout_kills_everything(guest_kit: GuestKit) -> None:
    # Through the trio wrapper, which the async tests of other suites use.
    with pytest.raises(GuestError, match="did not finish within") as info:
        await run_guest_async("sleep 600", kit=guest_kit, timeout=15)
    result = info.value.result
    assert result is not None and result.timed_out
    assert result.qemu_returncode is not None  # QEMU was reaped, not left running
