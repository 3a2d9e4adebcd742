"""A device bug must never take the server down: QEMU cannot survive a dead server (the next
guest reset aborts the VM), so a raising callback becomes an EIO reply and a raising task is
logged, and the server keeps serving."""

import errno

import pytest

from vfu_server.client import Client
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import running_server

BUGGY = "tests.integration.buggy_device:Buggy"


async def test_raising_callbacks_and_tasks_are_contained():
    async with running_server(BUGGY) as server:
        async with await Client.connect(server.socket_path) as dev:
            with pytest.raises(RemoteError) as info:
                await dev.read32(0, 8)
            assert info.value.errno == errno.EIO
            with pytest.raises(RemoteError) as info:
                await dev.write32(0, 4, 1)
            assert info.value.errno == errno.EIO
            await dev.write32(0, 4, 1, posted=True)  # a posted write gets no reply, even on error
            await dev.write32(0, 0, 1)  # spawns a task that raises
            assert await dev.read32(0, 0) == 7
        # A new client after all that is still served.
        async with await Client.connect(server.socket_path) as dev:
            assert await dev.config_read(0, 4) == 0xBAD01234
        assert await server.terminate() == 0
    log = server.stderr()
    for text in ("bug in run()", "bug in a device task", "bug in a read callback", "bug in a write callback"):
        assert text in log, f"{text!r} should be logged with its traceback"
