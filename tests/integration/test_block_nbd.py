"""NbdBackend (libnbd) against real NBD servers from Debian: qemu-nbd and nbdkit, over TCP and
Unix sockets, with TLS (certificates or a pre-shared key, made here with certtool/psktool),
multi-conn, and servers that fail or go away mid-I/O.

The servers are required: if qemu-nbd, nbdkit or gnutls-bin is missing these tests FAIL
(``./run test`` installs the Debian packages qemu-utils, nbdkit, gnutls-bin and python3-libnbd).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import struct
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

if nbd_mod.load() is None:
    pytest.fail("libnbd's Python bindings are not in .venv: install python3-libnbd (./run test does)",
                pytrace=False)

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


def in_flight(b: NbdBackend) -> int:
    return sum(len(c.ops) for c in b.conns)


async def test_negotiated_export(backend: NbdBackend) -> None:
    assert backend.size == DISK
    assert not backend.read_only
    assert backend.block_size == 512
    assert backend.can_flush and backend.can_fua and backend.can_zero
    d = backend.describe()
    assert d["kind"] == "nbd" and d["size"] == DISK and d["uri"].startswith("nbd") and d["client"] == "libnbd"


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
        peak = max(peak, in_flight(backend))
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

async def test_open_backend_with_uri_and_size_prefix(server: Server) -> None:
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
                assert not b.can_zero
                b.can_fua = False
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
                assert in_flight(b) == 0, "the abandoned read left the in-flight set when it completed"
                assert b.connected
    finally:
        srv.kill()


async def test_multi_conn_spreads_concurrent_requests(short_tmp: Path) -> None:
    srv = nbdkit(short_tmp, "memory", f"{DISK}")  # the memory plugin offers multi-conn
    try:
        with trio.fail_after(60):
            async with NbdBackend.open(srv.uri, connections=4) as b:
                assert b.connections == 4
                peaks = [0] * 4

                async def one(i: int) -> None:
                    data = pattern(16384, seed=i)
                    await b.writev(i * 16384, [memoryview(data)])
                    for k, c in enumerate(b.conns):
                        peaks[k] = max(peaks[k], len(c.ops))
                    assert await read(b, i * 16384, 16384) == data

                async with trio.open_nursery() as nursery:
                    for i in range(64):
                        nursery.start_soon(one, i)
                assert sum(1 for p in peaks if p) >= 2, "requests went to more than one connection"
                await b.flush()
                assert await read(b, 0, 64 * 16384) == b"".join(pattern(16384, seed=i) for i in range(64))
    finally:
        srv.kill()


# -- TLS -------------------------------------------------------------------------------------


def make_certificates(d: Path) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, in the
    file names qemu-nbd, nbdkit and libnbd look for."""
    certtool = tool("certtool", "gnutls-bin")

    def run(*args: str) -> None:
        subprocess.run([certtool, *args], check=True, capture_output=True, timeout=60)

    (d / "ca.info").write_text("cn = vfu test CA\nca\ncert_signing_key\nexpiration_days = 2\n")
    (d / "server.info").write_text("organization = vfu\ncn = localhost\ndns_name = localhost\n"
                                   "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
                                   "expiration_days = 2\n")
    (d / "client.info").write_text("organization = vfu\ncn = vfu-server\ntls_www_client\nencryption_key\n"
                                   "signing_key\nexpiration_days = 2\n")
    run("--generate-privkey", "--outfile", str(d / "ca-key.pem"))
    run("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"), "--template", str(d / "ca.info"),
        "--outfile", str(d / "ca-cert.pem"))
    for who in ("server", "client"):
        run("--generate-privkey", "--outfile", str(d / f"{who}-key.pem"))
        run("--generate-certificate", "--load-privkey", str(d / f"{who}-key.pem"),
            "--load-ca-certificate", str(d / "ca-cert.pem"), "--load-ca-privkey", str(d / "ca-key.pem"),
            "--template", str(d / f"{who}.info"), "--outfile", str(d / f"{who}-cert.pem"))
    return d


@pytest.mark.parametrize("which", ["qemu-nbd", "nbdkit"])
async def test_tls_with_certificates(short_tmp: Path, which: str) -> None:
    pki = make_certificates(short_tmp)
    pidfile = short_tmp / "tls.pid"
    port = free_port()
    image = short_tmp / "tls.raw"
    image.write_bytes(bytes(DISK))
    if which == "qemu-nbd":
        cmd = [tool("qemu-nbd", "qemu-utils"), "--fork", f"--pid-file={pidfile}", "--format=raw",
               "--export-name=disk", "--persistent", "--bind=127.0.0.1", f"--port={port}",
               "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
               "--tls-creds=tls0", str(image)]
    else:
        cmd = [tool("nbdkit", "nbdkit"), "-P", str(pidfile), "-i", "127.0.0.1", "-p", str(port),
               "--tls=require", f"--tls-certificates={pki}", "--tls-verify-peer", "-e", "disk",
               "file", str(image)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    srv = Server(f"nbds://127.0.0.1:{port}/disk", pidfile, image, pid=read_pidfile(pidfile))
    try:
        with trio.fail_after(60):
            async with open_backend(f"{srv.uri}?tls-certificates={pki}") as b:
                await b.writev(4096, [memoryview(pattern(8192))], fua=True)
                assert await read(b, 4096, 8192) == pattern(8192)
            # Without TLS the server refuses us, and says so.
            with pytest.raises(BlockIOError, match=r"(?i)tls"):
                async with NbdBackend.open(f"nbd://127.0.0.1:{port}/disk"):
                    pass
            # A CA that did not sign the server's certificate: refused.
            (short_tmp / "other").mkdir()
            other = make_certificates(short_tmp / "other")
            with pytest.raises(BlockIOError):
                async with NbdBackend.open(f"{srv.uri}?tls-certificates={other}"):
                    pass
        with open(image, "rb") as f:
            f.seek(4096)
            assert f.read(8192) == pattern(8192)
    finally:
        srv.kill()


async def test_tls_with_a_pre_shared_key(short_tmp: Path) -> None:
    psk = short_tmp / "keys.psk"
    subprocess.run([tool("psktool", "gnutls-bin"), "-u", "vfu", "-p", str(psk)], check=True,
                   capture_output=True, timeout=30)
    srv = nbdkit(short_tmp, "--tls=require", f"--tls-psk={psk}", "memory", "4M")
    try:
        uri = srv.uri.replace("nbd+unix://", "nbds+unix://vfu@") + f"&tls-psk-file={psk}"
        with trio.fail_after(60):
            async with open_backend(uri) as b:
                await b.writev(0, [memoryview(b"k" * 4096)])
                assert await read(b, 0, 4096) == b"k" * 4096
            bad = short_tmp / "bad.psk"
            bad.write_text("vfu:" + "00" * 32 + "\n")
            with pytest.raises(BlockIOError):
                async with NbdBackend.open(uri.replace(str(psk), str(bad))):
                    pass
    finally:
        srv.kill()


# -- servers that go away ------------------------------------------------------------------


async def test_server_death_fails_pending_and_later_requests(short_tmp: Path) -> None:
    srv = nbdkit(short_tmp, "--filter=delay", "memory", "4M", "delay-read=60")
    errors: list[BlockIOError] = []
    try:
        with trio.fail_after(30):
            async with NbdBackend.open(srv.uri, connections=1) as b:

                async def reader(i: int) -> None:
                    try:
                        await read(b, i * 4096, 4096)
                    except BlockIOError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    for i in range(32):
                        nursery.start_soon(reader, i)
                    while in_flight(b) < 32:
                        await trio.sleep(0.01)
                    srv.kill()
                assert len(errors) == 32 and all("NBD" in str(e) for e in errors)
                assert not b.connected
                with pytest.raises(BlockIOError):
                    await b.writev(0, [memoryview(b"x" * 512)])
                with pytest.raises(BlockIOError):
                    await b.flush()
    finally:
        srv.kill()


async def test_nothing_acknowledged_that_was_not_written(short_tmp: Path) -> None:
    srv = qemu_nbd(short_tmp, "unix")
    assert srv.image is not None
    acked: list[tuple[int, bytes]] = []
    failed = 0
    try:
        with trio.fail_after(60):
            async with NbdBackend.open(srv.uri) as b:

                async def worker(i: int) -> None:
                    nonlocal failed
                    for k in range(10_000):
                        offset = (i * 64 + k % 64) * 65536
                        data = pattern(65536, seed=(i * 7 + k) % 251)
                        try:
                            await b.writev(offset, [memoryview(data)])
                        except BlockIOError:
                            failed += 1
                            return
                        acked.append((offset, data))

                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        nursery.start_soon(worker, i)
                    while len(acked) < 200:
                        await trio.sleep(0.005)
                    srv.kill()
                assert failed == 16, "every worker saw the server go, none hung"
    finally:
        srv.kill()
    latest = dict(acked)  # the last acknowledged write of each offset
    with open(srv.image, "rb") as f:
        for offset, data in latest.items():
            f.seek(offset)
            assert f.read(len(data)) == data, f"acknowledged write at {offset} is not in the image"


async def test_a_device_on_nbds(short_tmp: Path) -> None:
    """End to end: an NVMe server whose namespace is an export over TLS (PSK)."""
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing import running_server
    from vfu_server.testing.nvme import NvmeTestDriver

    psk = short_tmp / "keys.psk"
    subprocess.run([tool("psktool", "gnutls-bin"), "-u", "vfu", "-p", str(psk)], check=True,
                   capture_output=True, timeout=30)
    srv = nbdkit(short_tmp, "--tls=require", f"--tls-psk={psk}", "memory", "8M")
    uri = srv.uri.replace("nbd+unix://", "nbds+unix://vfu@") + f"&tls-psk-file={psk}"
    try:
        async with running_server("nvme", "--backing", uri) as dev_srv, \
                await Client.connect(dev_srv.socket_path) as client:
            with GuestRam(16 << 20) as ram:
                drv = NvmeTestDriver(client, ram)
                await drv.start()
                await drv.create_io_queue_pair(1)
                await drv.write(1, 16, pattern(8192))
                assert await drv.read(1, 16, 8192) == pattern(8192)
    finally:
        srv.kill()


# -- closing: the final flush completes promptly, whoever cancelled the backend's tasks --------


async def test_close_flushes_promptly_when_the_callers_tasks_are_cancelled(short_tmp: Path) -> None:
    """A device's tasks (the backend's caller) are cancelled at shutdown and after a handover:
    the close's flush must still get its reply (the pumps run until the close is done) instead
    of waiting for its timeout, and the connections end with NBD_CMD_DISC."""
    logfile = short_tmp / "nbdkit.log"
    srv = nbdkit(short_tmp, "--filter=log", "memory", f"{DISK}", f"logfile={logfile}")
    try:
        with trio.fail_after(60):
            with trio.CancelScope() as scope:
                async with NbdBackend.open(srv.uri) as b:
                    await b.writev(4096, [memoryview(pattern(8192))])
                    cancelled_at = trio.current_time()
                    scope.cancel()
                    await trio.sleep_forever()
            took = trio.current_time() - cancelled_at
        assert took < 5, f"the close took {took:.1f} s after the cancellation"
        assert not b.connected and in_flight(b) == 0
        lines = logfile.read_text().splitlines()
        flushes = [ln for ln in lines if "...Flush id=" in ln and "return=0" in ln]
        assert flushes, "the close's flush got no reply:\n" + "\n".join(lines[-20:])
        assert sum("Disconnect" in ln for ln in lines) >= len(b.conns), "\n".join(lines[-20:])
    finally:
        srv.kill()


@pytest.mark.parametrize("handover", [False, True], ids=["sigterm", "handover"])
async def test_a_device_on_nbd_exits_promptly_on_sigterm_and_after_a_handover(short_tmp: Path,
                                                                              handover: bool) -> None:
    """NVMe on qemu-nbd: a server exits at once on SIGTERM, and a predecessor at once after
    handing over (each close flushes through its own connections), and every acknowledged
    write is in qemu-nbd's image."""
    from test_handover import nvme_with_control

    from vfu_server.testing.handover import hand_over

    srv = qemu_nbd(short_tmp, "unix")
    assert srv.image is not None
    written: dict[int, bytes] = {}
    successor = None
    try:
        with trio.fail_after(120):
            async with nvme_with_control("--backing", srv.uri) as (pred, ctl, drv, _q):
                for i in range(8):
                    written[i * 64] = pattern(8192, seed=i)
                    await drv.write(1, i * 64, written[i * 64])
                last = pred
                if handover:
                    t0 = trio.current_time()
                    # hand_over checks that the predecessor exits 0 within exit_timeout.
                    successor = last = await hand_over(pred, ctl, "--backing", srv.uri, exit_timeout=10)
                    assert trio.current_time() - t0 < 10
                    for i in range(8, 16):
                        written[i * 64] = pattern(8192, seed=i)
                        await drv.write(1, i * 64, written[i * 64])
                    assert await drv.read(1, 0, 8192) == written[0]  # the predecessor's, read anew
                t0 = trio.current_time()
                rc = await last.terminate(timeout=10)
                took = trio.current_time() - t0
                assert rc == 0, f"the server did not exit 0 on SIGTERM within 10 s (rc {rc}):\n" \
                                f"{last.stderr()[-3000:]}"
                assert took < 10
                assert "Traceback" not in pred.stderr() + last.stderr()
    finally:
        if successor is not None:
            await successor.kill()
        srv.kill()
    with open(srv.image, "rb") as f:
        for lba, data in written.items():
            f.seek(lba * 512)
            assert f.read(len(data)) == data, f"acknowledged write at LBA {lba} is not in the image"


# -- a handover makes the predecessor's writes visible to the successor's connection -----------

HERE = Path(__file__).resolve().parent


def per_connection_cache(tmp: Path, *extra: str) -> tuple[Server, Path]:
    """nbdkit on nbd_per_connection_cache.py: no multi-conn, and each connection's writes
    reach the image (and the other connections) only when it flushes or leaves. The second
    value is the plugin's call log (``METHOD HANDLE ...`` lines)."""
    image, log = tmp / "pc.img", tmp / "pc.log"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    srv = nbdkit(tmp, "sh", str(HERE / "nbd_per_connection_cache.py"), f"image={image}", f"log={log}",
                 *extra, name="pc")
    srv.image = image
    return srv, log


def connection_calls(log: Path) -> tuple[list[str], list[list[str]]]:
    """The handles in the order their connections opened, and every call as its words."""
    calls = [line.split() for line in log.read_text().splitlines()]
    return [c[1] for c in calls if c[0] == "open"], calls


def first(calls: list[list[str]], handle: str, methods: tuple[str, ...]) -> int:
    return next((i for i, c in enumerate(calls) if c[0] in methods and c[1] == handle), len(calls))


class BlkDevice:
    """The two block devices behind one small driver interface: write, read (bytes at LBA)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def start(self, client: object, ram: object) -> None:
        if self.kind == "nvme":
            from vfu_server.testing.nvme import NvmeTestDriver

            self.drv = NvmeTestDriver(client, ram)  # type: ignore[arg-type]
            await self.drv.start()
            await self.drv.create_io_queue_pair(1)
        else:
            from vfu_server.testing.virtio import init_device

            await client.dma_map(ram)  # type: ignore[attr-defined]
            _dev, (self.q,) = await init_device(client, ram, queues=(0,), size=16, slot_size=16384)  # type: ignore[arg-type]

    async def write(self, lba: int, data: bytes) -> None:
        if self.kind == "nvme":
            await self.drv.write(1, lba, data)
            return
        req = self.q.add([struct.pack("<IIQ", 1, 0, lba), data], [1])
        await self.q.kick()
        (got,) = await self.q.wait_used(1, timeout=30)
        assert got.head == req.head and got.data(0)[0] == 0, f"write at LBA {lba} failed"

    async def read(self, lba: int, length: int) -> bytes:
        if self.kind == "nvme":
            return await self.drv.read(1, lba, length)
        req = self.q.add([struct.pack("<IIQ", 0, 0, lba)], [length, 1])
        await self.q.kick()
        (got,) = await self.q.wait_used(1, timeout=30)
        assert got.head == req.head and got.data(1)[0] == 0, f"read at LBA {lba} failed"
        return bytes(got.data(0))


@pytest.mark.parametrize("device", ["nvme", "virtio-blk"])
async def test_handover_flushes_before_the_successor_reads_on_a_server_without_multi_conn(
        short_tmp: Path, device: str) -> None:
    """A server without multi-conn may keep each connection's writes from the others until it
    flushes. The predecessor flushes when it quiesces for the handover, before it sends the
    state, so the successor's own connection reads every write the guest saw complete, at
    once (not only once the predecessor has closed its connection, after the commit). The
    plugin delays each flush by 2 s: a flush left to the predecessor's close would still be
    on its way when the successor reads."""
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing import running_server
    from vfu_server.testing.handover import start_successor

    srv, log = per_connection_cache(short_tmp, "flush_delay=2")
    ctl = str(short_tmp / "ctl")
    written = {i * 64: pattern(8192, seed=i) for i in range(6)}
    successor = None
    try:
        with trio.fail_after(120), GuestRam(16 << 20) as ram:
            async with running_server(device, "--control-socket", ctl, "--backing", srv.uri) as pred, \
                    await Client.connect(pred.socket_path) as client:
                blk = BlkDevice(device)
                await blk.start(client, ram)
                for lba, data in written.items():
                    await blk.write(lba, data)
                successor = await start_successor(device, ctl, "--backing", srv.uri)
                # Read through the successor at once: the predecessor may still be on its way out.
                for lba, data in written.items():
                    assert await blk.read(lba, len(data)) == data, f"the successor read stale data at LBA {lba}"
                with trio.move_on_after(30):
                    await pred.process.wait()
                assert pred.process.returncode == 0, pred.stderr()[-3000:]
        handles, calls = connection_calls(log)
        assert len(handles) == 2, f"one connection each without multi-conn, got {handles}"
        theirs, ours = handles
        flushed = first(calls, theirs, ("flush",))
        assert flushed < len(calls) and int(calls[flushed][2]) > 0, "the predecessor's writes were never flushed"
        assert flushed < first(calls, ours, ("pread", "pwrite")), \
            "the successor used its connection before the predecessor flushed:\n" + log.read_text()
        assert "Traceback" not in pred.stderr() + successor.stderr()
    finally:
        if successor is not None:
            await successor.terminate()
        srv.kill()


async def test_handover_is_refused_when_the_flush_fails(short_tmp: Path) -> None:
    """A flush that fails at the handover's quiesce refuses the handover: the predecessor
    rolls back and goes on serving, with every acknowledged write; once flushes work again,
    the next handover goes through and the successor reads them all."""
    from test_handover import nvme_with_control

    from vfu_server.testing.handover import ServerStartFailed, hand_over, start_successor

    failing = short_tmp / "flushes-fail"
    srv, _log = per_connection_cache(short_tmp, f"flush_fails_if={failing}")
    successor = None
    try:
        with trio.fail_after(120):
            async with nvme_with_control("--backing", srv.uri) as (pred, ctl, drv, _q):
                await drv.write(1, 8, pattern(4096))
                failing.touch()
                with pytest.raises(ServerStartFailed) as info:
                    await start_successor("nvme", ctl, "--backing", srv.uri)
                last = info.value.stderr.strip().splitlines()[-1]
                assert "handover refused" in last and "might not read every write" in last, last
                assert pred.process.returncode is None
                assert await drv.read(1, 8, 4096) == pattern(4096)
                await drv.write(1, 16, pattern(4096, seed=9))
                failing.unlink()
                successor = await hand_over(pred, ctl, "--backing", srv.uri)
                assert await drv.read(1, 8, 4096) == pattern(4096)
                assert await drv.read(1, 16, 4096) == pattern(4096, seed=9)
    finally:
        if successor is not None:
            await successor.terminate()
        srv.kill()


async def test_make_writes_visible_flushes_only_after_a_write(short_tmp: Path) -> None:
    """NbdBackend.make_writes_visible: a flush when a write, zeroing or trim ended since the
    last flush, none otherwise (a successor's quiesce, a snapshot of an idle device)."""
    srv, log = per_connection_cache(short_tmp)
    try:
        with trio.fail_after(60):
            async with NbdBackend.open(srv.uri) as b:
                assert b.connections == 1  # no multi-conn

                def flushes() -> int:
                    return sum(c[0] == "flush" for c in connection_calls(log)[1])

                await b.make_writes_visible()
                assert flushes() == 0
                await b.writev(0, [memoryview(pattern(4096))])
                await b.make_writes_visible()
                assert flushes() == 1
                await b.make_writes_visible()
                await read(b, 0, 4096)
                await b.make_writes_visible()
                assert flushes() == 1
                await b.write_zeroes(8192, 4096)
                await b.make_writes_visible()
                assert flushes() == 2
    finally:
        srv.kill()
