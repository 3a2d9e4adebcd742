"""NVMe admin commands: Identify CNS variants, features, log pages, AER, abort, keep alive,
format, unsupported opcodes."""

from __future__ import annotations

import struct

from vfu_devices.nvme.constants import Status
from vfu_server.testing.nvme import (
    ADMIN_ABORT,
    ADMIN_AER,
    ADMIN_FORMAT,
    ADMIN_GET_FEATURES,
    ADMIN_GET_LOG_PAGE,
    ADMIN_IDENTIFY,
    ADMIN_KEEP_ALIVE,
    ADMIN_SET_FEATURES,
    SubmissionEntry,
    nvme_session,
)


async def test_identify_variants() -> None:
    async with nvme_session("--size", "2M", "--namespaces", "3") as (drv, _):
        ctrl = await drv.identify(1)
        assert struct.unpack_from("<I", ctrl, 516)[0] == 3
        assert ctrl[768:800].startswith(b"nqn.")
        assert struct.unpack_from("<I", ctrl, 536)[0] & 1  # SGLs
        assert struct.unpack_from("<H", ctrl, 256)[0] & (1 << 8)  # doorbell buffer config
        active = struct.unpack_from("<4I", await drv.identify(2))
        assert active == (1, 2, 3, 0)
        assert struct.unpack_from("<2I", await drv.identify(2, nsid=2)) == (3, 0)
        assert struct.unpack_from("<4I", await drv.identify(7, csi=0)) == (1, 2, 3, 0)
        ids = {await drv.identify(3, nsid=n) for n in (1, 2, 3)}
        assert len(ids) == 3  # unique identifiers per namespace
        assert await drv.identify(5, nsid=1, csi=0) == bytes(4096)
        assert await drv.identify(6, csi=0) == bytes(4096)
        assert (await drv.identify(8, nsid=2))[20] & 1  # namespace ready
        buf = drv.buffer(4096)
        for cns, nsid, csi, want in ((5, 1, 2, Status.INVALID_FIELD), (6, 0, 1, Status.INVALID_FIELD),
                                     (0x10, 0, 0, Status.INVALID_FIELD), (0xFF, 0, 0, Status.INVALID_FIELD),
                                     (0, 4, 0, Status.INVALID_NAMESPACE), (3, 0, 0, Status.INVALID_NAMESPACE),
                                     (2, 0xFFFFFFFE, 0, Status.INVALID_FIELD)):
            c = await drv.admin(ADMIN_IDENTIFY, nsid=nsid, prp1=buf, cdw10=cns, cdw11=csi << 24)
            assert c.code == want, (cns, nsid, csi, c)
        # Identify into an unmapped buffer
        c = await drv.admin(ADMIN_IDENTIFY, prp1=1 << 44, cdw10=1)
        assert c.code == Status.DATA_TRANSFER_ERROR


async def test_features() -> None:
    async with nvme_session("--size", "1M", "--max-queues", "8") as (drv, _):
        c = await drv.get_feature(0x07)
        assert c.dw0 == (7 << 16 | 7)
        for fid, value in ((0x01, 0x03020103), (0x05, 0x10), (0x08, 0x0A05), (0x0A, 1), (0x0B, 0x1FF),
                           (0x0F, 5000), (0x06, 0)):
            assert (await drv.set_feature(fid, value)).ok, hex(fid)
            assert (await drv.get_feature(fid)).dw0 == value, hex(fid)
        assert (await drv.get_feature(0x06, sel=1)).dw0 == 1  # default: write cache on
        assert (await drv.get_feature(0x06, sel=3)).dw0 & 0x4  # changeable
        assert (await drv.set_feature(0x06, 1, save=True)).code == Status.FEATURE_NOT_SAVEABLE
        assert (await drv.set_feature(0x02, 1)).code == Status.INVALID_FIELD  # power state 1
        assert (await drv.set_feature(0x02, 0)).ok
        assert (await drv.set_feature(0x05, 1 << 16)).code == Status.INVALID_FIELD  # DULBE
        # temperature thresholds: over (default WCTEMP), under, per sensor
        assert (await drv.get_feature(0x04)).dw0 & 0xFFFF == 343
        assert (await drv.set_feature(0x04, 1 << 20 | 250)).ok
        assert (await drv.get_feature(0x04, 1 << 20)).dw0 & 0xFFFF == 250
        assert (await drv.get_feature(0x04, 3 << 20)).code == Status.INVALID_FIELD
        # interrupt vector configuration
        assert (await drv.set_feature(0x09, 1 << 16 | 3)).ok
        assert (await drv.get_feature(0x09, 3)).dw0 == (1 << 16 | 3)
        assert (await drv.get_feature(0x09, 500)).code == Status.INVALID_FIELD
        # number of queues: 0xFFFF is invalid, and not after I/O queues exist
        assert (await drv.set_feature(0x07, 0xFFFF)).code == Status.INVALID_FIELD
        await drv.create_io_queue_pair(1, entries=8)
        assert (await drv.set_feature(0x07, 0)).code == Status.COMMAND_SEQUENCE_ERROR
        # unsupported feature
        assert (await drv.get_feature(0x7F)).code == Status.INVALID_FIELD
        assert (await drv.set_feature(0x03, 0)).code == Status.INVALID_FIELD
        # timestamp: data buffer, host origin after a set
        buf = drv.buffer(8)
        drv.ram.write(buf, (1_700_000_000_000).to_bytes(6, "little") + bytes(2))
        assert (await drv.admin(ADMIN_SET_FEATURES, prp1=buf, cdw10=0x0E)).ok
        out = drv.buffer(8)
        assert (await drv.admin(ADMIN_GET_FEATURES, prp1=out, cdw10=0x0E)).ok
        ts = int.from_bytes(drv.ram.read(out, 6), "little")
        assert 1_700_000_000_000 <= ts < 1_700_000_000_000 + 60_000
        assert drv.ram.read(out + 6, 1)[0] & 0xE == 0x2
        # host behavior support: 512 bytes round trip
        hbs = drv.buffer(512)
        drv.ram.write(hbs, b"\x01" + bytes(511))
        assert (await drv.admin(ADMIN_SET_FEATURES, prp1=hbs, cdw10=0x16)).ok
        out = drv.buffer(512)
        assert (await drv.admin(ADMIN_GET_FEATURES, prp1=out, cdw10=0x16)).ok
        assert drv.ram.read(out, 1) == b"\x01"


async def test_log_pages_and_smart_counters() -> None:
    async with nvme_session("--size", "4M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=16)
        smart0 = await drv.get_log_page(0x02, 512)
        for i in range(10):
            await drv.write(q, i * 256, bytes(128 * 1024))
        for _ in range(4):
            await drv.read(q, 0, 4096)
        smart = await drv.get_log_page(0x02, 512)

        def u128(raw: bytes, off: int) -> int:
            return int.from_bytes(raw[off : off + 16], "little")

        assert struct.unpack_from("<H", smart, 1)[0] > 273  # composite temperature in Kelvin
        assert u128(smart, 48) - u128(smart0, 48) == -(-10 * 256 // 1000)  # data units written
        assert u128(smart, 80) - u128(smart0, 80) == 10  # host write commands
        assert u128(smart, 64) - u128(smart0, 64) == 4  # host read commands
        assert u128(smart, 112) >= 1  # power cycles
        # error log records failed commands, newest first
        await drv.admin(0x55)  # invalid opcode
        errors = await drv.get_log_page(0x01, 64 * 4)
        count, sqid, _cid, status = struct.unpack_from("<QHHH", errors, 0)
        assert count >= 1 and sqid == 0 and (status >> 1) & 0x7FF == Status.INVALID_OPCODE
        # firmware slot, changed namespaces, command effects
        fw = await drv.get_log_page(0x03, 512)
        assert fw[0] == 1 and fw[8:11] == b"0.1"
        assert await drv.get_log_page(0x04, 4096) == bytes(4096)
        effects = await drv.get_log_page(0x05, 4096)
        acs = struct.unpack_from("<256I", effects, 0)
        iocs = struct.unpack_from("<256I", effects, 1024)
        assert acs[0x06] & 1 and acs[0x80] & 0x3 == 0x3 and iocs[0x01] & 0x3 == 0x3 and iocs[0x02] == 1
        # offset into a log page
        part = await drv.get_log_page(0x05, 1024, offset=1024)
        assert part == effects[1024:2048]
        buf = drv.buffer(4096)
        c = await drv.admin(ADMIN_GET_LOG_PAGE, prp1=buf, cdw10=0x7F | 127 << 16)
        assert c.code == Status.INVALID_LOG_PAGE
        c = await drv.admin(ADMIN_GET_LOG_PAGE, prp1=buf, cdw10=0x02 | 127 << 16, cdw12=4096)
        assert c.code == Status.INVALID_FIELD
        c = await drv.admin(ADMIN_GET_LOG_PAGE, prp1=buf, cdw10=0x02 | 127 << 16, cdw12=2)
        assert c.code == Status.INVALID_FIELD


async def test_async_events() -> None:
    async with nvme_session("--size", "1M") as (drv, _):
        aers = [await drv.submit(0, SubmissionEntry(ADMIN_AER)) for _ in range(4)]
        c = await drv.admin(ADMIN_AER)
        assert c.code == Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED
        # Enable SMART temperature events, then set an over-temperature threshold below
        # the current temperature: a SMART/health event for log page 2.
        assert (await drv.set_feature(0x0B, 0xFF)).ok
        assert (await drv.set_feature(0x04, 300)).ok
        event = await drv.wait(0, aers[0])
        assert event.ok and event.dw0 & 0x7 == 1 and (event.dw0 >> 8) & 0xFF == 1 and (event.dw0 >> 16) & 0xFF == 2
        smart = await drv.get_log_page(0x02, 512, rae=True)
        assert smart[0] & 0x2  # critical warning: temperature
        # An invalid doorbell write raises an error event (type 0), even with SMART masked.
        await drv.client.write32(0, 0x1000 + 8 * 9, 1)
        event = await drv.wait(0, aers[1])
        assert event.dw0 & 0x7 == 0 and (event.dw0 >> 16) & 0xFF == 1
        # While SMART events are masked (not cleared), a new one waits; reading the log with
        # RAE=0 unmasks and delivers.
        assert (await drv.set_feature(0x04, 343)).ok
        assert (await drv.set_feature(0x04, 290)).ok
        await drv.reap(drv.queues[0])
        assert aers[2] in drv.queues[0].outstanding  # masked until the log page is read
        await drv.get_log_page(0x02, 512)
        event = await drv.wait(0, aers[2])
        assert event.dw0 & 0x7 == 1
        await drv.get_log_page(0x01, 64)


async def test_abort_keep_alive_unsupported() -> None:
    async with nvme_session("--size", "1M") as (drv, _):
        c = await drv.admin(ADMIN_ABORT, cdw10=5 << 16)
        assert c.ok and c.dw0 & 1  # not aborted
        assert (await drv.admin(ADMIN_KEEP_ALIVE)).ok
        for opcode in (0x03, 0x0D, 0x10, 0x11, 0x81, 0xC0, 0xFF):
            c = await drv.admin(opcode)
            assert c.code == Status.INVALID_OPCODE and c.dnr, hex(opcode)
        c = await drv.admin(ADMIN_KEEP_ALIVE, flags=1)  # fused
        assert c.code == Status.INVALID_FIELD
        c = await drv.admin(ADMIN_IDENTIFY, flags=3 << 6, cdw10=1)  # PSDT reserved
        assert c.code == Status.INVALID_FIELD


async def test_format_nvm() -> None:
    async with nvme_session("--size", "4M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=8)
        await drv.write(q, 0, b"\xee" * 4096)
        assert (await drv.admin(ADMIN_FORMAT, nsid=1, cdw10=1)).ok  # LBA format 1: 4 KiB
        ns = await drv.identify(0, nsid=1)
        assert ns[26] & 0xF == 1 and struct.unpack_from("<Q", ns)[0] == 1024
        assert await drv.read(q, 0, 4096, block=4096) == b"\xee" * 4096  # SES 0 keeps data
        assert (await drv.admin(ADMIN_FORMAT, nsid=1, cdw10=1 << 9)).ok  # user data erase, 512
        ns = await drv.identify(0, nsid=1)
        assert ns[26] & 0xF == 0 and struct.unpack_from("<Q", ns)[0] == 8192
        assert await drv.read(q, 0, 4096) == bytes(4096)
        assert (await drv.admin(ADMIN_FORMAT, nsid=1, cdw10=5)).code == Status.INVALID_FORMAT
        assert (await drv.admin(ADMIN_FORMAT, nsid=1, cdw10=1 << 5)).code == Status.INVALID_FORMAT  # PI
        assert (await drv.admin(ADMIN_FORMAT, nsid=1, cdw10=2 << 9)).code == Status.INVALID_FIELD
        assert (await drv.admin(ADMIN_FORMAT, nsid=9)).code == Status.INVALID_NAMESPACE
        assert (await drv.admin(ADMIN_FORMAT, nsid=0xFFFFFFFF)).ok
