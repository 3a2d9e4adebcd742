"""A device bug must never take the server down: QEMU cannot survive a dead server (the next
guest reset aborts the VM), so a raising callback becomes an EIO reply and a raising task is
logged, and the server keeps serving."""

import errno
import subprocess
import sys
import time

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


def test_a_device_that_cannot_get_ready_is_a_one_line_start_error(tmp_path):
    sock = tmp_path / "dev.sock"
    out = subprocess.run([sys.executable, "-m", "vfu_server", "tests.integration.buggy_device:NeverReady",
                          "--socket-path", str(sock)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout == "", "never 'listening' for a device that is not ready"
    assert out.stderr.strip().splitlines()[-1].endswith("connection refused")
    assert len(out.stderr.strip().splitlines()) == 1
    assert not sock.exists()


async def test_listening_only_once_the_device_is_ready():
    t0 = time.monotonic()
    async with running_server("tests.integration.buggy_device:SlowToStart") as server:
        assert time.monotonic() - t0 >= 0.5
        async with await Client.connect(server.socket_path) as dev:
            assert await dev.config_read(0, 4) == 0xBAD21234
