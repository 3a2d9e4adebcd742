"""What a device developer meets: failures that show the device's traceback, the command line
that finds their class, and mistakes refused with a message that says what to change."""

import errno

import pytest

from vfu_server.client import Client
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import running_server

BUGGY = "tests.integration.buggy_device:Buggy"


async def test_a_failing_test_carries_the_device_traceback():
    with pytest.raises(RemoteError) as info:
        async with running_server(BUGGY) as server, await Client.connect(server.socket_path) as dev:
            await dev.read32(0, 8)  # the device's reader raises RuntimeError
    assert info.value.errno == errno.EIO
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"--- stderr of vfu-server {BUGGY} ---" in notes
    assert "Traceback (most recent call last)" in notes
    assert "RuntimeError: bug in a read callback" in notes
    assert "buggy_device.py" in notes, "the note points at the device's own source line"

