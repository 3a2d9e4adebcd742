"""Run ``vfu-server`` as a separate process, exactly as a user would, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..client import Client, GuestRam


@dataclass
class ServerProcess:
    device: str
    socket_path: str
    process: trio.Process
    stderr_path: Path

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class ServerStartFailed(RuntimeError):
    """A server process did not get to ``listening on``: its exit code and stderr."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _server_env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {**os.environ, **(env or {})}
    repo_root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, full_env.get("PYTHONPATH")) if p)
    return full_env


async def spawn_server(device: str, args: tuple[str, ...] | list[str], *, socket_path: str = "",
                       ready_timeout: float = 20.0, env: dict[str, str] | None = None,
                       prefix: tuple[str, ...] = ()) -> ServerProcess:
    """Start ``python -m vfu_server DEVICE *args`` and wait for ``listening on``. A process
    that does not get there is killed (if still running) and raised as :class:`ServerStartFailed`
    with its exit code and stderr. The caller stops the process it gets. ``prefix``: a command
    to run it under (``ip netns exec NS``)."""
    workdir = tempfile.mkdtemp(prefix="vfu-test-")
    stderr_path = Path(workdir) / "server.stderr"
    cmd = [*prefix, sys.executable, "-m", "vfu_server", device, *args]
    with open(stderr_path, "wb") as err:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err, env=_server_env(env))
    server = ServerProcess(device, socket_path, proc, stderr_path)
    assert proc.stdout is not None
    line = b""
    with trio.move_on_after(ready_timeout):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"listening on"):
        if proc.returncode is None:
            with trio.move_on_after(2):
                await proc.wait()  # a refusal exits by itself; give it the moment it needs
        await server.kill()
        await proc.stdout.aclose()
        raise ServerStartFailed(f"{' '.join(cmd)} did not start (stdout {line!r}, rc {proc.returncode}):\n"
                                f"{server.stderr()}", proc.returncode, server.stderr())
    if not socket_path:
        server.socket_path = line[len(b"listening on "):].decode().strip()
    return server


@asynccontextmanager
async def running_server(
    device: str,
    *args: str,
    socket_path: str | None = None,
    ready_timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """Start ``python -m vfu_server DEVICE --socket-path PATH *args`` and wait for
    ``listening on``. Always stops the process on exit; the error message of a failed start
    includes the server's stderr."""
    path = socket_path or os.path.join(tempfile.mkdtemp(prefix="vfu-test-"),
                                       f"{device.replace(':', '_').replace('/', '_')}.sock")
    server = await spawn_server(device, ("--socket-path", path, *args), socket_path=path,
                                ready_timeout=ready_timeout, env=env)
    try:
        yield server
    finally:
        await server.terminate()
        if server.process.stdout is not None:
            await server.process.stdout.aclose()


@asynccontextmanager
async def migration_pair(
    device: str,
    src_args: tuple[str, ...] = (),
    dst_args: tuple[str, ...] | None = None,
    *,
    ram_size: int = 32 << 20,
    map_src: bool = True,
) -> AsyncIterator[tuple[Client, Client, GuestRam]]:
    """Two servers of ``device`` (source and destination, ``dst_args`` defaulting to
    ``src_args``), a connected client for each and one guest RAM mapped into both, as a VMM that
    migrates between them would have it. ``map_src=False`` leaves mapping the source to a driver
    that does it itself (the NVMe test driver does). A failure carries both servers' stderr."""
    async with (
        running_server(device, *src_args) as a,
        running_server(device, *(src_args if dst_args is None else dst_args)) as b,
    ):
        try:
            with GuestRam(ram_size) as ram:  # outlives both clients
                async with (
                    await Client.connect(a.socket_path) as src,
                    await Client.connect(b.socket_path) as dst,
                ):
                    if map_src:
                        await src.dma_map(ram)
                    await dst.dma_map(ram)
                    yield src, dst, ram
        except BaseException as exc:
            exc.add_note(f"--- source stderr ---\n{a.stderr()[-3000:]}\n"
                         f"--- destination stderr ---\n{b.stderr()[-3000:]}")
            raise
