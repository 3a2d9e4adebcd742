"""A device with bugs on purpose: its callbacks and tasks raise."""

import trio

from vfu_server import MemoryBar, PciDevice, PciIdentity


class Buggy(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD0)
    bar0 = MemoryBar(0x1000, register_size=4)

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        if offset == 8:
            raise RuntimeError("bug in a read callback")
        return 7

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        async def broken_task() -> None:
            raise ValueError("bug in a device task")

        if offset == 0:
            self.spawn(broken_task)
        elif offset == 4:
            raise ZeroDivisionError("bug in a write callback")

    async def run(self) -> None:
        raise KeyError("bug in run()")


class NeverReady(PciDevice):
    """Its backend cannot be reached: run() fails before it reports ready."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD1)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(0.1)
        raise ConnectionRefusedError("backend nbd://127.0.0.1:1/x: connection refused")


class SlowToStart(PciDevice):
    """Ready only after a while; ``listening`` must not be printed before."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD2)
    bar0 = MemoryBar(0x1000)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(0.5)
        self.became_ready = True
        task_status.started()
        await trio.sleep_forever()
