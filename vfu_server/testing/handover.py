"""Live handover from tests and benchmarks: run a successor process (``vfu-server DEVICE
--take-over CTL``) against a running server.

::

    async with running_server("nvme", "--control-socket", ctl) as old:
        ...                                       # a client attached, I/O in flight
        new = await hand_over(old, ctl, "--poll-us", "0")
        ...                                       # the same client, now served by ``new``
        await new.terminate()

A refused handover raises :class:`~vfu_server.testing.process.ServerStartFailed` (its
``returncode`` and ``stderr``, whose last line says why); the predecessor keeps serving.
"""

from __future__ import annotations

import trio

from .process import ServerProcess, ServerStartFailed, spawn_server

__all__ = ["ServerStartFailed", "hand_over", "start_successor"]


async def start_successor(device: str, control: str, *args: str, env: dict[str, str] | None = None,
                          ready_timeout: float = 60.0, prefix: tuple[str, ...] = ()) -> ServerProcess:
    """Start ``vfu-server DEVICE --take-over CONTROL *args`` and wait until it serves (its
    ``listening on PATH``); its ``socket_path`` is the PATH it took over. The caller stops it.
    ``prefix``: a command to run it under (``ip netns exec NS``)."""
    return await spawn_server(device, ("--take-over", control, *args), ready_timeout=ready_timeout, env=env,
                              prefix=prefix)


async def hand_over(predecessor: ServerProcess, control: str, *args: str, env: dict[str, str] | None = None,
                    exit_timeout: float = 30.0, prefix: tuple[str, ...] = ()) -> ServerProcess:
    """Replace ``predecessor`` by a successor with ``args`` (the same device), and check that
    the predecessor then exits 0 by itself."""
    successor = await start_successor(predecessor.device, control, *args, env=env, prefix=prefix)
    with trio.move_on_after(exit_timeout):
        await predecessor.process.wait()
    if predecessor.process.returncode != 0:
        await successor.terminate()
        raise AssertionError(f"predecessor did not exit 0 after the handover (rc {predecessor.process.returncode}):\n"
                             f"{predecessor.stderr()[-3000:]}")
    return successor
