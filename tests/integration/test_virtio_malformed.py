"""Generated malformed descriptor chains sent to real device processes: the server must
never crash or hang, must flag DEVICE_NEEDS_RESET (or fail the request), and must serve a
correct request again after a reset."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.client import Client, GuestRam
from vfu_server.testing.virtio import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VirtioDriver,
)

REPO = Path(__file__).resolve().parents[2]
RAM = 8 << 20
QSIZE = 16


@pytest.fixture(scope="module", params=["virtio-blk", "virtio-rng"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """One server process for all examples (a process per example would take minutes)."""
    workdir = tempfile.mkdtemp(prefix="vfu-fuzz-")
    sock = os.path.join(workdir, "dev.sock")
    extra = ["--size", "1M"] if request.param == "virtio-blk" else []
    err = open(os.path.join(workdir, "stderr"), "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "vfu_server", request.param, "--socket-path", sock, *extra],
                            stdout=subprocess.PIPE, stderr=err, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"listening on"), line
    yield request.param, sock
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    err.close()
    text = Path(workdir, "stderr").read_text()
    assert "Traceback" not in text, text


addresses = st.one_of(st.sampled_from([0x200000, 0x200100, RAM - 8, RAM, 0, 2**64 - 16]), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.sampled_from([0, 1, 16, 32, 513, 0xFFFFFFFF]), st.integers(0, 2**32 - 1))
flags = st.one_of(st.sampled_from([0, DESC_F_NEXT, 2, 3, DESC_F_INDIRECT]), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, QSIZE + 1), st.integers(0, 0xFFFF))
descriptor = st.tuples(addresses, lengths, flags, nexts)
scenario = st.fixed_dictionaries({
    "descs": st.lists(descriptor, min_size=1, max_size=QSIZE),
    "indirect": st.lists(descriptor, max_size=6),
    "heads": st.lists(st.one_of(st.integers(0, QSIZE + 1), st.integers(0, 0xFFFF)), min_size=1, max_size=QSIZE),
    "avail_idx": st.one_of(st.none(), st.integers(0, 0xFFFF)),
    "payload": st.binary(max_size=64),
})


async def _attack(sock: str, device: str, sc: dict) -> None:  # type: ignore[type-arg]
    async with await Client.connect(sock) as client:
        ram = GuestRam(RAM)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram)
        with trio.fail_after(20):
            await dev.negotiate(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
            q = await dev.setup_queue(0, QSIZE)
            await dev.driver_ok()
            ram.write(0x200000, sc["payload"] or b"\0")
            for i, d in enumerate(sc["descs"]):
                q.put_descriptor(i, *d)
            for i, d in enumerate(sc["indirect"]):
                q.put_descriptor(i, *d, table=0x200100)
            for h in sc["heads"]:
                q.publish(h)
            if sc["avail_idx"] is not None:
                q.set_avail_idx(sc["avail_idx"])
            await q.kick(force=True)
            await trio.sleep(0.02)
            await dev.status()  # still answering
            # Recovery: reset and one well-formed request must work.
            await dev.negotiate(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
            q = await dev.setup_queue(0, QSIZE)
            await dev.driver_ok()
            if device == "virtio-blk":
                req = q.add([struct.pack("<IIQ", 0, 0, 0)], [512, 1])
            else:
                req = q.add([], [64])
            await q.kick()
            (done,) = await q.wait_used(1, timeout=10)
            assert done is req and done.written in (513, 64)
        await client.dma_unmap_all()
        await dev.reset()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenario)
def test_malformed_chains_never_crash_or_hang(server: tuple[str, str], sc: dict) -> None:  # type: ignore[type-arg]
    device, sock = server
    trio.run(_attack, sock, device, sc)
