"""serve() as a library call: a device served in this process from a :class:`ServeOptions`, its
hooks called in order, stopped by SIGTERM, its socket file removed."""

from __future__ import annotations

import os
import signal

import trio

from vfu_devices.example import MAGIC, DmaCopyEngine
from vfu_server.client import Client
from vfu_server.server import ServeHooks, ServeOptions, Server, serve

TIMEOUT = 30


async def test_serve_runs_a_device_from_options_until_sigterm(tmp_path) -> None:
    path = str(tmp_path / "example.sock")
    calls: list[object] = []

    async def before_serving(socket_path: str | None, control_path: str | None) -> None:
        calls.append(("before_serving", socket_path, control_path))

    hooks = ServeHooks(on_listening=lambda: calls.append("on_listening"),
                       on_stopping=lambda: calls.append("on_stopping"), before_serving=before_serving)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, DmaCopyEngine(), ServeOptions(socket_path=path, hooks=hooks))
            assert isinstance(server, Server)
            assert calls == [("before_serving", path, None), "on_listening"]
            async with await Client.connect(path) as c:
                assert await c.read32(0, 0) == MAGIC
            os.kill(os.getpid(), signal.SIGTERM)  # serve()'s own signal receiver takes it
    assert calls[-1] == "on_stopping"
    assert not os.path.exists(path)
