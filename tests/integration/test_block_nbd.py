"""NbdBackend against real NBD servers from Debian: qemu-nbd (Unix socket and TCP) and nbdkit.

The servers are required: if qemu-nbd or nbdkit is missing these tests FAIL (``./run test``
installs the Debian packages qemu-utils and nbdkit).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from vfu_server.block import (
    BackendSpecError,
    BlockIOError,
    BlockReadOnlyError,
    NbdBackend,
    open_backend,
)
from vfu_server.block import nbd as nbd_mod

MiB = 1 << 20
DISK = 64 * MiB


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install the Debian package {package} (./run test does)",
            pytrace=False,
        )
    return path


def pattern(n: int, seed: int = 5) -> bytes:
    cycle = bytes((i * 17 + seed) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A daemonised NBD server; both tools fork only once their socket is listening."""

    uri: str
    pidfile: Path
    image: Path | None = None
    pid: int = field(default=0)

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # Not our child (it daemonised), so we cannot wait(); poll until it is gone or a
            # zombie (dead, awaiting a slow reaper) so that its sockets are closed.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not _dead(self.pid):
                time.sleep(0.01)
            self.pid = 0


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def read_pidfile(pidfile: Path) -> int:
    # The daemon writes it after the parent we waited for has exited, so poll briefly.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        time.sleep(0.01)
    pytest.fail(f"NBD server wrote no pid file {pidfile}", pytrace=False)


def start(cmd: list[str], server: Server) -> Server:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[0]} failed to start: {proc.stderr.strip()}", pytrace=False)
    server.pid = read_pidfile(server.pidfile)
    return server


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nbd-") as d:
        yield Path(d)


def qemu_nbd(tmp: Path, transport: str, *extra: str) -> Server:
    exe = tool("qemu-nbd", "qemu-utils")
    image = tmp / "disk.raw"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(DISK)
    pidfile = tmp / "qemu-nbd.pid"
    common = [exe, "--fork", f"--pid-file={pidfile}", "--format=raw", "--export-name=disk"]
    common += ["--persistent", "--shared=16", "--discard=unmap", *extra]
    if transport == "unix":
        sock = tmp / "q.sock"
        srv = Server(f"nbd+unix:///disk?socket={sock}", pidfile, image)
        return start([*common, f"--socket={sock}", str(image)], srv)
    for _ in range(5):  # the port may be grabbed between free_port() and bind
        port = free_port()
        srv = Server(f"nbd://127.0.0.1:{port}/disk", pidfile, image)
        cmd = [*common, "--bind=127.0.0.1", f"--port={port}", str(image)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            srv.pid = read_pidfile(pidfile)
            return srv
    pytest.fail(f"qemu-nbd could not listen on TCP: {proc.stderr.strip()}", pytrace=False)


def nbdkit(tmp: Path, *args: str, name: str = "k") -> Server:
    exe = tool("nbdkit", "nbdkit")
    sock = tmp / f"{name}.sock"
    pidfile = tmp / f"{name}.pid"
    srv = Server(f"nbd+unix:///?socket={sock}", pidfile)
    return start([exe, "-U", str(sock), "-P", str(pidfile), *args], srv)


@pytest.fixture(params=["qemu-unix", "qemu-tcp", "nbdkit-memory"])
def server(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Server]:
    if request.param == "qemu-unix":
        srv = qemu_nbd(short_tmp, "unix")
    elif request.param == "qemu-tcp":
        srv = qemu_nbd(short_tmp, "tcp")
    else:
        srv = nbdkit(short_tmp, "memory", f"{DISK}")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def backend(server: Server) -> AsyncIterator[NbdBackend]:
    with trio.fail_after(30):
        async with NbdBackend.open(server.uri) as b:
            yield b


async def read(b: NbdBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await b.readv(offset, [memoryview(buf)])
    return bytes(buf)


async def test_negotiated_export(backend: NbdBackend) -> None:
    assert backend.size == DISK
    assert not backend.read_only
    assert backend.block_size == 512
    flags = backend.transmission_flags
    for flag in (nbd_mod.TF_SEND_FLUSH, nbd_mod.TF_SEND_FUA, nbd_mod.TF_SEND_WRITE_ZEROES):
        assert flags & flag
    d = backend.describe()
    assert d["kind"] == "nbd" and d["size"] == DISK and d["uri"].startswith("nbd")


async def test_data_round_trip(backend: NbdBackend, server: Server) -> None:
    data = pattern(3 * 4096 + 512)
    with trio.fail_after(30):
        await backend.writev(8192, [memoryview(data)[:100], memoryview(data)[100:]])
        bufs = [bytearray(n) for n in (4096, 4096, 4096 + 512)]
        await backend.readv(8192, [memoryview(x) for x in bufs])
        assert b"".join(bufs) == data
        await backend.writev(DISK - 4096, [memoryview(b"E" * 4096)], fua=True)
        assert await read(backend, DISK - 4096, 4096) == b"E" * 4096
        await backend.flush()
    if server.image is not None:  # qemu-nbd: the bytes really are in its file
        with open(server.image, "rb") as f:
            f.seek(8192)
            assert f.read(len(data)) == data
            f.seek(DISK - 4096)
            assert f.read(4096) == b"E" * 4096


async def test_requests_split_above_max_payload(backend: NbdBackend) -> None:
    backend.max_payload = 64 * 1024  # as if the server had said so
    data = pattern(MiB + 4096, seed=9)
    with trio.fail_after(30):
        await backend.writev(4096, [memoryview(data)])
        assert await read(backend, 4096, len(data)) == data


async def test_64_concurrent_requests(backend: NbdBackend) -> None:
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        data = pattern(16384, seed=i)
        await backend.writev(i * 16384, [memoryview(data)], fua=(i % 16 == 0))
        peak = max(peak, len(backend._pending))
        assert await read(backend, i * 16384, 16384) == data

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(one, i)
        assert peak > 1, "requests were not pipelined"
        whole = await read(backend, 0, 64 * 16384)
        assert whole == b"".join(pattern(16384, seed=i) for i in range(64))


async def test_flush_trim_discard_write_zeroes(backend: NbdBackend, server: Server) -> None:
    data = pattern(4 * MiB)
    with trio.fail_after(30):
        await backend.writev(0, [memoryview(data)])
        await backend.flush()
        blocks_before = os.stat(server.image).st_blocks if server.image else 0
        await backend.discard(MiB, MiB)  # may deallocate, must read back zero
        await backend.write_zeroes(2 * MiB, 4096)  # must stay allocated (NO_HOLE)
        await backend.write_zeroes(3 * MiB, 8192, may_unmap=True)
        await backend.trim(3 * MiB + 8192, 4096)  # advisory: contents undefined
        await backend.flush()
        got = await read(backend, 0, 4 * MiB)
    expect = bytearray(data)
    for a, n in ((MiB, MiB), (2 * MiB, 4096), (3 * MiB, 8192)):
        expect[a : a + n] = bytes(n)
    trimmed = slice(3 * MiB + 8192, 3 * MiB + 12288)
    got_b = bytearray(got)
    got_b[trimmed] = expect[trimmed] = b""
    assert got_b == expect
    if server.image is not None:  # qemu-nbd --discard=unmap punched the file
        assert os.stat(server.image).st_blocks * 512 <= blocks_before * 512 - MiB // 2


async def test_open_backend_with_uri_and_size_prefix(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFU_NBD_CLIENT", "builtin")  # where libnbd is installed it is the default
    with trio.fail_after(30):
        async with open_backend(server.uri, size="1M") as b:
            assert isinstance(b, NbdBackend)
            assert b.size == MiB and b.export_size == DISK
            await b.writev(0, [memoryview(b"p" * 512)])
            assert await read(b, 0, 512) == b"p" * 512
        with pytest.raises(BackendSpecError, match="smaller than --size"):
            async with open_backend(server.uri, size=DISK * 2):
                pass


async def test_unknown_export_is_a_clear_error(short_tmp: Path) -> None:
    srv = qemu_nbd(short_tmp, "unix")
    try:
        with trio.fail_after(30), pytest.raises(BlockIOError, match=r"unknown export|nope"):
            async with NbdBackend.open(srv.uri.replace("/disk?", "/nope?")):
                pass
    finally:
        srv.kill()


async def test_connection_refused_is_block_io_error(short_tmp: Path) -> None:
    with trio.fail_after(10):
        with pytest.raises(BlockIOError) as info:
            async with NbdBackend.open(f"nbd+unix:///x?socket={short_tmp}/absent.sock"):
                pass
        assert info.value.errno == errno.ENOENT
        with pytest.raises(BlockIOError):
            async with NbdBackend.open(f"nbd://127.0.0.1:{free_port()}/x"):
                pass


@pytest.mark.parametrize("which", ["qemu", "nbdkit"])
async def test_read_only_export(short_tmp: Path, which: str) -> None:
    srv = (
        qemu_nbd(short_tmp, "unix", "--read-only")
        if which == "qemu"
        else nbdkit(short_tmp, "-r", "memory", "1M")
    )
    try:
        with trio.fail_after(30):
            async with NbdBackend.open(srv.uri) as b:
                assert b.read_only
                assert await read(b, 0, 512) == bytes(512)
                with pytest.raises(BlockReadOnlyError):
                    await b.writev(0, [memoryview(b"w" * 512)])
                with pytest.raises(BlockReadOnlyError):
                    await b.discard(0, 512)
                await b.flush()
    finally:
        srv.kill()


async def test_server_without_fua_or_write_zeroes(short_tmp: Path) -> None:
    # The fallbacks: FUA becomes write + flush, zeroing becomes plain writes of zeroes.
    # nbdkit 1.32's fua filter rejects fuamode=none, so the missing FUA flag is simulated on
    # our side; the missing WRITE_ZEROES is real (nozero filter).
    srv = nbdkit(short_tmp, "--filter=nozero", "memory", "4M", "zeromode=none")
    try:
        with trio.fail_after(30):
            async with NbdBackend.open(srv.uri) as b:
                assert not b.transmission_flags & nbd_mod.TF_SEND_WRITE_ZEROES
                b.transmission_flags &= ~nbd_mod.TF_SEND_FUA
                await b.writev(0, [memoryview(pattern(MiB))], fua=True)
                await b.write_zeroes(4096, 3 * MiB // 2 - 4096)
                await b.discard(0, 512)
                expect = bytearray(pattern(MiB))
                expect[0:512] = bytes(512)
                expect[4096:] = bytes(MiB - 4096)
                assert await read(b, 0, MiB) == expect
                assert await read(b, MiB, MiB // 2) == bytes(MiB // 2)
    finally:
        srv.kill()


async def test_cancelled_read_does_not_break_the_connection(short_tmp: Path) -> None:
    srv = nbdkit(short_tmp, "--filter=delay", "memory", "4M", "delay-read=500ms")
    try:
        with trio.fail_after(30):
            async with NbdBackend.open(srv.uri) as b:
                await b.writev(0, [memoryview(b"a" * 4096)])
                victim = bytearray(4096)
                with trio.move_on_after(0.1) as scope:
                    await b.readv(0, [memoryview(victim)])
                assert scope.cancelled_caught
                # The late reply is drained, not written into the abandoned buffer.
                assert await read(b, 0, 4096) == b"a" * 4096
                assert victim == bytes(4096)
                assert b.connected
    finally:
        srv.kill()


async def test_server_death_fails_pending_and_later_requests(short_tmp: Path) -> None:
    # delay-read keeps reads pending in the server while we kill it.
    srv = nbdkit(short_tmp, "--filter=delay", "memory", "4M", "delay-read=60")
    try:
        errors: list[BaseException] = []
        with trio.fail_after(20):
            async with NbdBackend.open(srv.uri) as b:

                async def reader(i: int) -> None:
                    try:
                        await read(b, i * 4096, 4096)
                    except BlockIOError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    for i in range(64):
                        nursery.start_soon(reader, i)
                    while len(b._pending) < 64:
                        await trio.sleep(0.01)
                    srv.kill()
                assert len(errors) == 64
                assert all(e.errno == errno.EIO for e in errors)  # type: ignore[attr-defined]
                assert not b.connected
                with pytest.raises(BlockIOError):
                    await b.writev(0, [memoryview(b"x" * 512)])
                with pytest.raises(BlockIOError):
                    await b.flush()
            # aclose on a dead connection is quiet and prompt.
    finally:
        srv.kill()


async def test_qemu_nbd_killed_under_load(short_tmp: Path) -> None:
    srv = qemu_nbd(short_tmp, "unix")
    outcomes = {"ok": 0, "failed": 0}
    try:
        with trio.fail_after(30):
            async with NbdBackend.open(srv.uri) as b:

                async def worker(i: int) -> None:
                    data = pattern(65536, seed=i)
                    for k in range(10_000):
                        try:
                            await b.writev((i * 64 + k % 64) * 65536, [memoryview(data)])
                            outcomes["ok"] += 1
                        except BlockIOError:
                            outcomes["failed"] += 1
                            return

                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        nursery.start_soon(worker, i)
                    while outcomes["ok"] < 200:
                        await trio.sleep(0.005)
                    srv.kill()
                assert outcomes["failed"] == 16  # every worker saw the death, none hung
                assert not b.connected
    finally:
        srv.kill()
