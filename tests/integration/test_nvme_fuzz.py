"""Generated NVMe commands: every one completes with a status, the server never crashes or
hangs, and it still serves correct I/O afterwards.

Guest RAM is mapped at 4 GiB so that small garbage addresses (hypothesis likes 0) are unmapped
and cannot scribble over the test driver's queues; addresses meant to be valid are drawn from
a scratch area above the queues.
"""

from __future__ import annotations

import os
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.client import Client, GuestRam
from vfu_server.testing.nvme import NvmeTestDriver, SubmissionEntry, sgl_descriptor
from vfu_server.testing.process import running_server

RAM_BASE = 1 << 32
RAM_SIZE = 16 << 20
SCRATCH = RAM_BASE + (4 << 20)
# Admin opcodes left out: Delete I/O SQ/CQ (would delete the driver's own queue), AER (does
# not complete by design) and Doorbell Buffer Config (changes how the driver must ring).
EXCLUDED_ADMIN = {0x00, 0x04, 0x0C, 0x7C}

u32 = st.one_of(st.integers(0, 16), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
address = st.one_of(
    st.integers(SCRATCH, RAM_BASE + RAM_SIZE - 1),  # mapped, any alignment
    st.integers(0, (RAM_SIZE - (4 << 20)) // 4096 - 1).map(lambda p: SCRATCH + p * 4096),  # mapped pages
    st.integers(0, 2**64 - 1),  # almost surely unmapped
    st.just(0),
)
sgl = st.builds(
    lambda a, n, kind, sub: sgl_descriptor(a, n, kind, sub),
    address, st.one_of(st.integers(0, 64), st.integers(0, 1 << 20), st.integers(0, 0xFFFFFFFF)),
    st.integers(0, 15), st.one_of(st.just(0), st.integers(0, 15)),
) | st.binary(min_size=16, max_size=16)

admin_opcode = st.one_of(st.sampled_from([0x01, 0x02, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x18, 0x80]),
                         st.integers(0, 255)).filter(lambda op: op not in EXCLUDED_ADMIN)
io_opcode = st.one_of(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x0C]), st.integers(0, 255))


@st.composite
def commands(draw: st.DrawFn) -> tuple[bool, SubmissionEntry]:
    admin = draw(st.booleans())
    use_sgl = draw(st.booleans())
    entry = SubmissionEntry(
        opcode=draw(admin_opcode if admin else io_opcode),
        nsid=draw(st.one_of(st.just(1), st.just(0xFFFFFFFF), u32)),
        prp1=draw(address), prp2=draw(address),
        cdw10=draw(u32), cdw11=draw(u32), cdw12=draw(u32), cdw13=draw(u32), cdw14=draw(u32), cdw15=draw(u32),
        flags=draw(st.one_of(st.just(0x40) if use_sgl else st.just(0), st.integers(0, 255))),
        dptr=draw(sgl) if use_sgl else None,
    )
    return admin, entry


async def _run(cmds: list[tuple[bool, SubmissionEntry]], garbage: list[bytes]) -> None:
    async with running_server("nvme", "--size", "4M") as srv:
        try:
            async with await Client.connect(srv.socket_path) as client:
                drv = NvmeTestDriver(client, GuestRam(RAM_SIZE, base=RAM_BASE))
                drv.timeout = 15
                await drv.start()
                q = await drv.create_io_queue_pair(1, entries=64)
                # Garbage where valid-looking pointers land (PRP lists, SGL segments, data).
                for i, chunk in enumerate(garbage):
                    drv.ram.write(SCRATCH + i * 4096, chunk)
                for admin, entry in cmds:
                    c = await drv.command(0 if admin else q, entry)
                    assert 0 <= c.status < 1 << 15
                # Still serving: identify and a data round trip.
                await drv.identify(1)
                ns = await drv.identify(0, nsid=1)
                block = 1 << (struct.unpack_from("<I", ns, 128 + 4 * (ns[26] & 0xF))[0] >> 16 & 0xFF)
                data = os.urandom(block * 2)
                await drv.write(q, 5, data, block=block)
                assert await drv.read(q, 5, len(data), block=block) == data
            stderr = srv.stderr()
            assert "Traceback" not in stderr and "internal error" not in stderr, stderr
        except BaseException as exc:
            exc.add_note(f"--- server stderr ---\n{srv.stderr()[-4000:]}")
            raise


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(commands(), min_size=1, max_size=40),
       st.lists(st.binary(min_size=0, max_size=4096), max_size=8))
def test_generated_commands_always_complete(cmds: list[tuple[bool, SubmissionEntry]], garbage: list[bytes]) -> None:
    trio.run(_run, cmds, garbage)


async def test_garbage_doorbells_and_registers() -> None:
    async with running_server("nvme", "--size", "1M") as srv, await Client.connect(srv.socket_path) as client:
        drv = NvmeTestDriver(client, GuestRam(8 << 20, base=RAM_BASE))
        await drv.start()
        q = await drv.create_io_queue_pair(1, entries=8)
        # doorbells of queues that do not exist, values beyond the queue size, odd sizes
        for offset, value in ((0x1000 + 8 * 5, 1), (0x1000 + 8 * 1, 100), (0x1000 + 8 * 1 + 4, 7),
                              (0x1000 + 8 * 300, 3), (0x1ffc, 0xFFFFFFFF), (0x1000, 0x10000)):
            await client.write32(0, offset, value)
        await client.region_write(0, 0x1002, b"\x01\x02")
        await client.region_write(0, 0x1000, b"\x01" * 8)  # 8-byte doorbell write: ignored
        # read-only and reserved registers
        for offset in (0x00, 0x04, 0x08, 0x1C, 0x20, 0x38, 0x3C, 0x40, 0xE00, 0xFFC):
            await client.write32(0, offset, 0xFFFFFFFF)
        assert await drv.read32(0x08) == 0x00010400
        assert await drv.csts() & 1
        await drv.identify(1)
        await drv.write(q, 0, b"z" * 512)
        assert await drv.read(q, 0, 512) == b"z" * 512
