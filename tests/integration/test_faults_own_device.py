"""The fault engine is generic: a device of one's own declares its domain and gets --fault,
the control socket and FaultControl (tests/integration/faulty_device.py)."""

from __future__ import annotations

from pathlib import Path

from vfu_server.client import Client, GuestRam
from vfu_server.faults import FaultControl
from vfu_server.testing import running_server

DEVICE = "faulty_device:FaultyCopyEngine"


async def copy(dev: Client, irq, ram: GuestRam, data: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    ram.write(0x1000, data)
    for offset, value in ((0x08, 0x1000), (0x10, 0x2000), (0x18, len(data)), (0x1C, 1)):
        await dev.write32(0, offset, value)
    await irq.wait()
    return await dev.read32(0, 0x20), ram.read(0x2000, len(data))


async def test_own_device_with_rules(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    async with running_server(DEVICE, "--control-socket", ctl, "--fault", "op=copy,count=1,status=failed",
                              env={"PYTHONPATH": str(Path(__file__).parent)}) as srv, \
            await Client.connect(srv.socket_path) as dev, FaultControl(ctl) as fc:
        ram = GuestRam(1 << 20)
        await dev.dma_map(ram)
        await dev.enable_bus_master()  # the device may DMA only then
        irq = (await dev.enable_msix(1))[0]
        assert (await copy(dev, irq, ram, b"first"))[0] == 3, "the rule failed the first copy"
        assert await copy(dev, irq, ram, b"second") == (1, b"second")
        await fc.add("op=copy,corrupt=2,seed=4")
        status, got = await copy(dev, irq, ram, b"third")
        assert status == 1 and sum(bin(a ^ b).count("1") for a, b in zip(got, b"third", strict=True)) == 2
        listed = await fc.list()
        assert listed["domain"]["device"] == "faulty-copy" and [r["fired"] for r in listed["rules"]] == [1, 1]
        bad = await fc.request({"cmd": "fault-add", "rule": "op=copy,hang"})
        assert not bad["ok"] and "cannot do 'hang'" in bad["reason"]
