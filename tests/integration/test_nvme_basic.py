"""NVMe controller bring-up, Identify and data path through the vfio-user client (no VM)."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from vfu_devices.nvme.constants import Status
from vfu_server.client import Client, GuestRam
from vfu_server.testing.nvme import (
    IO_READ,
    IO_WRITE,
    NvmeTestDriver,
)
from vfu_server.testing.process import running_server

DISK = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


@asynccontextmanager
async def nvme(*args: str, ram: int = 32 << 20) -> AsyncIterator[NvmeTestDriver]:
    async with running_server("nvme", *args) as srv, await Client.connect(srv.socket_path) as client:
        drv = NvmeTestDriver(client, GuestRam(ram))
        drv.server = srv  # type: ignore[attr-defined]
        await drv.start()
        yield drv


async def test_registers_and_enable() -> None:
    async with running_server("nvme", "--size", "1M") as srv, await Client.connect(srv.socket_path) as client:
        drv = NvmeTestDriver(client, GuestRam(8 << 20))
        assert await client.config_read(0, 2) == 0x1234
        assert await client.config_read(0x09, 3) == 0x010802
        await drv.start(enable=False)
        cap = await drv.cap()
        assert cap & 0xFFFF == 1023  # MQES
        assert cap >> 16 & 1  # CQR
        assert cap >> 37 & 1  # NVM command set
        assert (cap >> 32) & 0xF == 0  # DSTRD
        assert await drv.read32(0x08) == 0x00010400
        assert await drv.read32(0x38) == 0 and await drv.read32(0x3C) == 0  # no CMB
        assert await drv.csts() == 0
        await drv.enable()
        assert await drv.csts() & 1
        await drv.disable()
        assert await drv.csts() == 0
        await drv.enable()
        assert await drv.csts() == 1


async def test_enable_with_bad_admin_queue_sets_cfs() -> None:
    async with running_server("nvme", "--size", "1M") as srv, await Client.connect(srv.socket_path) as client:
        drv = NvmeTestDriver(client, GuestRam(8 << 20))
        await drv.start(enable=False)
        await drv.write32(0x24, 0)  # admin queues of one entry
        await drv.write64(0x28, 0x1000)
        await drv.write64(0x30, 0x2000)
        await drv.write32(0x14, 4 << 20 | 6 << 16 | 1)
        assert await drv.wait_csts(0x2, 0x2) & 0x3 == 0x2
        await drv.write32(0x14, 0)  # reset clears CFS
        await drv.wait_csts(0x3, 0)
        await drv.enable()


async def test_identify_controller_and_namespace() -> None:
    async with nvme("--size", "8M", "--serial", "SER123", "--model", "Test Model", "--firmware", "9.9") as drv:
        ctrl = await drv.identify(1)
        assert ctrl[4:24].rstrip() == b"SER123"
        assert ctrl[24:64].rstrip() == b"Test Model"
        assert ctrl[64:72].rstrip() == b"9.9"
        assert ctrl[77] == 7  # MDTS: 512 KiB, as QEMU's nvme
        assert struct.unpack_from("<I", ctrl, 516)[0] == 1  # NN
        assert ctrl[512] == 0x66 and ctrl[513] == 0x44
        ns = await drv.identify(0, nsid=1)
        nsze = struct.unpack_from("<Q", ns, 0)[0]
        assert nsze == (8 << 20) // 512
        assert ns[26] & 0xF == 0
        assert struct.unpack_from("<I", ns, 128)[0] >> 16 & 0xFF == 9
        assert struct.unpack_from("<I", ns, 132)[0] >> 16 & 0xFF == 12
        active = await drv.identify(2)
        assert struct.unpack_from("<2I", active, 0) == (1, 0)
        descs = await drv.identify(3, nsid=1)
        assert descs[0] == 1 and descs[1] == 8  # EUI64 first
        # unsupported CNS
        buf = drv.buffer(4096)
        c = await drv.admin(0x06, prp1=buf, cdw10=0x1F)
        assert c.code == Status.INVALID_FIELD and c.dnr
        # namespace that does not exist
        c = await drv.admin(0x06, prp1=buf, nsid=7, cdw10=0)
        assert c.code == Status.INVALID_NAMESPACE


async def test_read_write_against_backing_file(image: Path) -> None:
    original = image.read_bytes()
    async with nvme("--backing", str(image)) as drv:
        await drv.set_num_queues(4)
        q = await drv.create_io_queue_pair(1, entries=16)
        assert await drv.read(q, 0, 4096) == original[:4096]
        assert await drv.read(q, 100, 8192) == original[100 * 512 : 100 * 512 + 8192]
        data = os.urandom(64 * 1024)
        await drv.write(q, 16, data)
        assert await drv.read(q, 16, len(data)) == data
        # unaligned buffer (PRP1 offset) and a 128 KiB transfer (PRP list)
        big = os.urandom(128 * 1024)
        await drv.write(q, 1024, big, fua=True)
        buf = drv.buffer(128 * 1024 + 4096) + 512
        c = await drv.io(q, IO_READ, slba=1024, nlb=255, buf=buf, length=128 * 1024)
        assert c.ok, c
        assert drv.ram.read(buf, 128 * 1024) == big
        # MDTS exceeded
        c = await drv.io(q, IO_READ, slba=0, nlb=1024, buf=drv.buffer(1024 * 512 + 512), length=1024 * 512 + 512)
        assert c.code == Status.INVALID_FIELD
        c = await drv.io(q, IO_READ, slba=0, nlb=1023, buf=drv.buffer(512 * 1024), length=512 * 1024)
        assert c.ok, c
        # LBA out of range
        c = await drv.io(q, IO_WRITE, slba=DISK // 512 - 1, nlb=1, buf=drv.buffer(1024), length=1024)
        assert c.code == Status.LBA_OUT_OF_RANGE
    on_disk = image.read_bytes()
    assert on_disk[16 * 512 : 16 * 512 + len(data)] == data
    assert on_disk[1024 * 512 : 1024 * 512 + len(big)] == big
