"""The libnbd backend against real NBD servers (qemu-nbd, nbdkit): plain TCP, Unix sockets,
TLS with certificates and with a pre-shared key (made here with certtool/psktool), multi-conn,
and servers that go away mid-I/O."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from test_block_nbd import (
    DISK,
    MiB,
    Server,
    free_port,
    nbdkit,
    pattern,
    qemu_nbd,
    read_pidfile,
    tool,
)
from test_block_nbd import server as server
from test_block_nbd import short_tmp as short_tmp

from vfu_server.block import BlockIOError, BlockReadOnlyError, open_backend
from vfu_server.block import libnbd as libnbd_mod
from vfu_server.block.libnbd import LibnbdBackend

pytestmark = pytest.mark.skipif(libnbd_mod.load() is None,
                                reason="libnbd's Python bindings are not in .venv (./run links python3-libnbd)")


async def read(b: LibnbdBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await b.readv(offset, [memoryview(buf)])
    return bytes(buf)


async def test_round_trip_split_and_zeroes(server: Server) -> None:
    data = pattern(3 * 4096 + 512)
    with trio.fail_after(60):
        async with open_backend(server.uri) as b:
            assert isinstance(b, LibnbdBackend) and b.describe()["client"] == "libnbd"
            assert b.size == DISK and not b.read_only and b.block_size == 512
            await b.writev(8192, [memoryview(data)[:100], memoryview(data)[100:]], fua=True)
            bufs = [bytearray(n) for n in (4096, 4096, 4096 + 512)]
            await b.readv(8192, [memoryview(x) for x in bufs])
            assert b"".join(bufs) == data
            b.max_payload = 64 * 1024  # as if the server had said so
            big = pattern(MiB + 4096, seed=9)
            await b.writev(MiB, [memoryview(big)])
            assert await read(b, MiB, len(big)) == big
            await b.discard(MiB, 4096)
            await b.write_zeroes(MiB + 8192, 4096)
            await b.flush()
            got = await read(b, MiB, 3 * 4096)
            assert got == bytes(4096) + big[4096:8192] + bytes(4096)
    if server.image is not None:
        with open(server.image, "rb") as f:
            f.seek(8192)
            assert f.read(len(data)) == data


async def test_multi_conn_spreads_concurrent_requests(short_tmp: Path) -> None:
    srv = nbdkit(short_tmp, "memory", f"{DISK}")  # the memory plugin offers multi-conn
    try:
        with trio.fail_after(60):
            async with LibnbdBackend.open(srv.uri, connections=4) as b:
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


async def test_read_only_export(short_tmp: Path) -> None:
    srv = qemu_nbd(short_tmp, "unix", "--read-only")
    try:
        with trio.fail_after(30):
            async with LibnbdBackend.open(srv.uri) as b:
                assert b.read_only
                with pytest.raises(BlockReadOnlyError):
                    await b.writev(0, [memoryview(b"w" * 512)])
                assert await read(b, 0, 512) == bytes(512)
    finally:
        srv.kill()


async def test_unreachable_and_unknown_exports_are_clear_errors(short_tmp: Path) -> None:
    with trio.fail_after(30):
        with pytest.raises(BlockIOError) as info:
            async with LibnbdBackend.open(f"nbd+unix:///x?socket={short_tmp}/absent.sock"):
                pass
        assert info.value.errno == errno.ENOENT and "absent.sock" in str(info.value)
        with pytest.raises(BlockIOError):
            async with LibnbdBackend.open(f"nbd://127.0.0.1:{free_port()}/x"):
                pass
        srv = qemu_nbd(short_tmp, "unix")
        try:
            with pytest.raises(BlockIOError, match=r"nope|export"):
                async with LibnbdBackend.open(srv.uri.replace("/disk?", "/nope?")):
                    pass
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
                async with LibnbdBackend.open(f"nbd://127.0.0.1:{port}/disk"):
                    pass
            # A CA that did not sign the server's certificate: refused.
            (short_tmp / "other").mkdir()
            other = make_certificates(short_tmp / "other")
            with pytest.raises(BlockIOError):
                async with LibnbdBackend.open(f"{srv.uri}?tls-certificates={other}"):
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
                async with LibnbdBackend.open(uri.replace(str(psk), str(bad))):
                    pass
    finally:
        srv.kill()


# -- servers that go away ------------------------------------------------------------------


async def test_server_death_fails_pending_and_later_requests(short_tmp: Path) -> None:
    srv = nbdkit(short_tmp, "--filter=delay", "memory", "4M", "delay-read=60")
    errors: list[BlockIOError] = []
    try:
        with trio.fail_after(30):
            async with LibnbdBackend.open(srv.uri, connections=1) as b:

                async def reader(i: int) -> None:
                    try:
                        await read(b, i * 4096, 4096)
                    except BlockIOError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    for i in range(32):
                        nursery.start_soon(reader, i)
                    while sum(len(c.ops) for c in b.conns) < 32:
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
            async with LibnbdBackend.open(srv.uri) as b:

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


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")
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
