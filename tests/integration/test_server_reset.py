"""A reset a device asks for during a write (FLR through config space) runs before that write's
reply and before the next message, in a separate server process over a real socket."""

from __future__ import annotations

import os

import trio

from vfu_server.client import Client
from vfu_server.protocol.constants import PciRegion
from vfu_server.testing import running_server

HERE = os.path.dirname(os.path.abspath(__file__))
FLR_DEVICE = "flr_device:FlrEngine"
SCRATCH = 0x04
PCI_CAP_ID_EXP = 0x10
DEVCTL = 8
INITIATE_FLR = 0x8000
TIMEOUT = 30


async def test_flr_resets_the_device_before_the_reply_and_the_next_message() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server(FLR_DEVICE, env={"PYTHONPATH": HERE}) as srv, \
                await Client.connect(srv.socket_path) as c:
            pcie = await c.find_capability(PCI_CAP_ID_EXP)
            assert pcie is not None
            devctl = await c.config_read(pcie + DEVCTL, 2)
            for posted in (False, True):
                await c.write32(0, SCRATCH, 0x5EED)
                assert await c.read32(0, SCRATCH) == 0x5EED
                await c.region_write(PciRegion.CONFIG, pcie + DEVCTL, (devctl | INITIATE_FLR).to_bytes(2, "little"),
                                     posted=posted)
                assert await c.read32(0, SCRATCH) == 0, f"posted={posted}: the device was not reset"
                assert not await c.config_read(pcie + DEVCTL, 2) & INITIATE_FLR  # the bit reads as 0
            await c.write32(0, SCRATCH, 7)  # and the device serves on
            assert await c.read32(0, SCRATCH) == 7
        assert srv.process.returncode in (0, None), srv.stderr()
