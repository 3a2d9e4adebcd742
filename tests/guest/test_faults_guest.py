"""Fault rules and power loss seen by Linux 6.12 in a QEMU 11.1 guest (docs/faults.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfu_guest import GuestKit, VfuDevice, run_guest

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


# e2fsprogs from the host (the guest kit has none): the binaries and the libraries they load
# that the guest's own glibc does not provide.
E2FS_LIBS = ("libext2fs.so.2", "libcom_err.so.2", "libblkid.so.1", "libuuid.so.1", "libe2p.so.2")
MARKER_LBA = 100_000  # past the file system's first block groups; read once, as a signal

POWER_CUT_WRITER = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
echo 1 > /proc/sys/kernel/sysrq
/opt/e2fs/mke2fs -q -t ext4 -F /dev/nvme0n1 > /tmp/mkfs 2>&1 || { sed "s/^/mkfs: /" /tmp/mkfs; exit 11; }
mkdir -p /mnt && mount -t ext4 /dev/nvme0n1 /mnt || exit 12
i=0
while [ $i -lt 12 ]; do
    dd if=/dev/urandom of=/mnt/synced$i bs=4096 count=$((i + 1)) conv=fsync 2>/dev/null || exit 13
    echo "sum$i=$(sha256sum < /mnt/synced$i | cut -d' ' -f1)"
    i=$((i + 1))
done
echo synced=12
# Unsynced work in flight while the power goes: new files, appends, renames, deletions.
# Written back to the device within a second (but flushed only by ext4's journal commits),
# some with O_DIRECT: the device's volatile cache holds plenty when the power goes.
echo 100 > /proc/sys/vm/dirty_expire_centisecs
echo 20 > /proc/sys/vm/dirty_writeback_centisecs
( n=0; while true; do
    dd if=/dev/urandom of=/mnt/busy$n bs=4096 count=8 oflag=direct 2>/dev/null
    cat /mnt/synced$((n % 12)) >> /mnt/busy0 2>/dev/null
    mv /mnt/busy$n /mnt/moved$n 2>/dev/null
    [ $n -gt 4 ] && rm -f /mnt/moved$((n - 4))
    n=$((n + 1))
  done ) &
sleep 3
dd if=/dev/nvme0n1 of=/dev/null bs=512 skip=__MARKER__ count=1 iflag=direct 2>/dev/null
echo marker=read
sleep 8
echo b > /proc/sysrq-trigger
"""

POWER_CUT_CHECK = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
mkdir -p /mnt && mount -t ext4 /dev/nvme0n1 /mnt || { dmesg | tail; exit 12; }
dmesg | grep -E 'EXT4-fs.*(recovery|orphan)' | sed 's/^/log: /'
i=0
while [ $i -lt 12 ]; do
    echo "got$i=$(sha256sum < /mnt/synced$i | cut -d' ' -f1)"
    i=$((i + 1))
done
umount /mnt || exit 13
/opt/e2fs/e2fsck -f -n /dev/nvme0n1 > /tmp/fsck 2>&1
echo "fsck_rc=$?"
sed 's/^/fsck: /' /tmp/fsck
"""


def _ask(path: str, msg: dict) -> dict:  # type: ignore[type-arg]
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


@pytest.mark.guest
def test_power_cut_under_ext4(guest_kit: GuestKit, tmp_path: Path) -> None:
    """ext4 on an NVMe namespace with a volatile write cache: twelve files written with fsync,
    then unsynced work, then a power cut that keeps a seeded half of the cached writes, and
    the guest dies with it (sysrq reboot). A second boot (a new server on the same image)
    mounts the file system (journal recovery), finds every fsynced file intact, and
    e2fsck -f finds it consistent."""
    import threading

    from vfu_guest.runner import GuestError

    e2fs = {f"/opt/e2fs/{tool}": f"/sbin/{tool}" for tool in ("mke2fs", "e2fsck")}  # not busybox's
    for lib in E2FS_LIBS:
        host = Path("/lib/x86_64-linux-gnu") / lib
        if not host.exists():
            pytest.skip(f"e2fsprogs not on this host ({host})")
        e2fs[f"/lib/x86_64-linux-gnu/{lib}"] = str(host.resolve())
    image = tmp_path / "ext4.img"
    image.write_bytes(bytes(64 * MIB))
    ctl = str(tmp_path / "nvme.ctl")
    device = _nvme(image, "--volatile-cache", "--control-socket", ctl,
                   "--fault", f"op=read,lba={MARKER_LBA},count=1,delay=1")
    outcome: dict[str, object] = {}

    def boot() -> None:
        try:
            outcome["result"] = run_guest(POWER_CUT_WRITER.replace("__MARKER__", str(MARKER_LBA)), [device],
                                          kit=guest_kit, timeout=400, extra_files=e2fs, check=False)
        except GuestError as exc:  # expected: the guest reboots instead of reporting a result
            outcome["result"] = exc.result

    thread = threading.Thread(target=boot)
    thread.start()
    try:
        import time

        deadline = time.monotonic() + 400
        marker = False
        while not marker and time.monotonic() < deadline and thread.is_alive():
            try:
                marker = bool(_ask(ctl, {"cmd": "fault-counters"})["fired"].get("1"))
            except OSError:
                pass  # the server is not up yet
            time.sleep(0.05)
        if marker:
            outcome["cut"] = _ask(ctl, {"cmd": "power-cut", "keep": 0.5, "seed": 3})
    finally:
        thread.join()
    first = outcome["result"]
    assert first is not None, "the first boot left no result"
    assert marker, f"the guest never got to the power cut:\n{first.diagnostics()}"  # type: ignore[attr-defined]
    facts = first.values()  # type: ignore[attr-defined]
    cut = outcome["cut"]
    assert cut["ok"] and cut["lost_bytes"] > 0, f"{cut}\n{first.output}"  # type: ignore[attr-defined,index]
    assert facts.get("synced") == "12" and facts.get("marker") == "read", first.output  # type: ignore[attr-defined]

    second = run_guest(POWER_CUT_CHECK, [_nvme(image)], kit=guest_kit, timeout=400, extra_files=e2fs)
    got = second.values()
    for i in range(12):
        assert got.get(f"got{i}") == facts[f"sum{i}"], f"fsynced file {i} changed:\n{second.output}"
    assert got.get("fsck_rc") == "0", second.output
    assert "recovery complete" in second.output or "orphan" in second.output, second.output
    _server_ok(second)


OCP = r"""
vfu_wait_dev /dev/nvme0n1 30 || exit 10
rd() { dd if=/dev/nvme0n1 of=/dev/null bs=4096 skip=$1 count=1 iflag=direct 2>/dev/null; }
rd 0 && echo before=ok || echo before=eio
# nvme-cli always sets "single instance" without --data; this entry repeats: flags 1, type 7.
printf '\001\000\007\000' > /tmp/entry && dd if=/dev/zero bs=28 count=1 >> /tmp/entry 2>/dev/null
nvme ocp set-error-injection /dev/nvme0 -N -d /tmp/entry > /tmp/set 2>&1 && echo set=ok
sed 's/^/set: /' /tmp/set
nvme ocp get-error-injection /dev/nvme0 -n 2>&1 | sed 's/^/get: /'
rd 1 && echo injected=ok || echo injected=eio
rd 2 && echo again=ok || echo again=eio
nvme ocp set-error-injection /dev/nvme0 -N -t 3 > /dev/null 2>&1 && echo plp=ok || echo plp=refused
nvme ocp set-error-injection /dev/nvme0 -N -n 0 > /dev/null 2>&1 && echo cleared=ok
rd 3 && echo after=ok || echo after=eio
"""


@pytest.mark.guest
def test_ocp_error_injection_from_the_guest(guest_kit: GuestKit, tmp_path: Path) -> None:
    """nvme-cli's OCP plugin in the guest injects NAND corruption (type 7): reads fail with an
    Unrecovered Read Error until the injection is cleared; a type with no equivalent here
    (PLP defect) is refused."""
    image = tmp_path / "nvme.img"
    image.write_bytes(os.urandom(DISK))
    result = run_guest(OCP, [_nvme(image)], kit=guest_kit, timeout=300)
    facts = result.values()
    assert facts.get("set") == "ok", result.output
    # nvme-cli 2.13 prints the count only (its get-error-injection never maps its buffer)
    assert "(Current: 1)" in result.output, result.output
    assert facts.get("before") == "ok", result.output
    assert facts.get("injected") == "eio" and facts.get("again") == "eio", result.output
    assert facts.get("plp") == "refused" and facts.get("cleared") == "ok", result.output
    assert facts.get("after") == "ok", result.output
    _server_ok(result)
