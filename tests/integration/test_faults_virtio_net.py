"""virtio-net frame faults (drop, dup, delay, corrupt; rx and tx) through a socket peer."""

from __future__ import annotations

from pathlib import Path

import trio
from test_virtio_net import GUEST_MAC, HDR, fill_rx, frame, peer_device, setup_net

from vfu_server.faults import FaultControl

PEER_MAC = b"\x02" * 6


def bit_diff(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


async def test_tx_drop_dup_corrupt(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    async with peer_device(tmp_path, "--control-socket", ctl, "--fault", "op=tx,every=2,drop") as \
            (_srv, client, peer, _), FaultControl(ctl) as fc:
        _dev, (_rx, tx, _cq) = await setup_net(client)
        sent = [frame(PEER_MAC, GUEST_MAC, i) for i in range(10)]
        for f in sent:
            tx.add([HDR + f])
        await tx.kick()
        await tx.wait_used(10)
        with trio.fail_after(10):
            got = [await peer.recv(65536) for _ in range(5)]
        assert got == sent[0::2], "every second frame is lost"
        await fc.remove("all")

        await fc.add("op=tx,count=1,dup")
        await fc.add("op=tx,count=1,corrupt=4,seed=1")
        one, two = frame(PEER_MAC, GUEST_MAC, 100), frame(PEER_MAC, GUEST_MAC, 101)
        tx.add([HDR + one])
        tx.add([HDR + two])
        await tx.kick()
        await tx.wait_used(2)
        with trio.fail_after(10):
            got = [await peer.recv(65536) for _ in range(3)]
        assert got[:2] == [one, one]
        assert got[2][:14] == two[:14] and bit_diff(got[2], two) == 4, "payload bits, not the header"
        assert await fc.fired() == {2: 1, 3: 1}


async def test_rx_drop_dup_delay(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    async with peer_device(tmp_path, "--control-socket", ctl) as (_srv, client, peer, _), \
            FaultControl(ctl) as fc:
        _dev, (rx, _tx, _cq) = await setup_net(client)
        fill_rx(rx, 64)
        await rx.kick()

        async def receive(n: int) -> list[bytes]:
            out: list[bytes] = []
            with trio.fail_after(20):
                while len(out) < n:
                    out += [r.data(0)[12 : r.written] for r in await rx.wait_used(1)]
            return out

        await fc.add("op=rx,count=1,drop")
        await fc.add("op=rx,count=1,dup")
        await fc.add("op=rx,count=1,delay=2s")
        frames = [frame(GUEST_MAC, PEER_MAC, i) for i in range(5)]
        for f in frames:
            await peer.send(f)
        got = await receive(5)
        # frame 0 lost, frame 1 twice, frame 2 held back two seconds behind 3 and 4
        assert got == [frames[1], frames[1], frames[3], frames[4], frames[2]]
        assert all(r["spent"] for r in (await fc.list())["rules"])
