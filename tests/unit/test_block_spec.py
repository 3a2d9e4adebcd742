"""--backing / --size parsing, NBD URIs, and open_backend for the local kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfu_server.block import (
    BackendSpec,
    BackendSpecError,
    FileBackend,
    MemoryBackend,
    NbdTarget,
    open_backend,
    parse_backend_spec,
    parse_nbd_uri,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("64k", 64 << 10),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("8GiB", 8 << 30),
        ("16MB", 16 << 20),
        (" 1G ", 1 << 30),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5G", "G", "1X", "1 G B", "ten", "1iB", 0])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(BackendSpecError) as info:
        parse_size(text)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("nbd://example.org/disk", NbdTarget("disk", host="example.org", port=10809)),
        ("nbd://127.0.0.1:1234/a%20b", NbdTarget("a b", host="127.0.0.1", port=1234)),
        ("nbd://[::1]:99/", NbdTarget("", host="::1", port=99)),
        ("nbd+tcp://h:1/x", NbdTarget("x", host="h", port=1)),
        ("nbd+unix:///exp?socket=/run/n.sock", NbdTarget("exp", socket_path="/run/n.sock")),
        ("nbd+unix://?socket=/s", NbdTarget("", socket_path="/s")),
    ],
)
def test_parse_nbd_uri(uri: str, target: NbdTarget) -> None:
    assert parse_nbd_uri(uri) == target
    assert parse_nbd_uri(target.uri) == target  # the canonical form round-trips


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("nbd:///disk", "no host"),
        ("nbd://h:notaport/x", "bad NBD URI"),
        ("nbd://h/x?socket=/s", "unexpected query"),
        ("nbd+unix:///x", "socket=PATH"),
        ("nbd+unix://host/x?socket=/s", "no host"),
        ("nbd+unix:///x?socket=/s&foo=1", "unexpected query"),
        ("nbd://h/x?tls-psk-file=/k", "need nbds"),
        ("nbd+ssh://h/x", "scheme"),
    ],
)
def test_parse_nbd_uri_rejects(uri: str, why: str) -> None:
    with pytest.raises(BackendSpecError, match=why):
        parse_nbd_uri(uri)


def test_parse_backend_spec_kinds(tmp_path: Path) -> None:
    assert parse_backend_spec(None, "1M") == BackendSpec("memory", size=1 << 20)
    assert parse_backend_spec("", 4096, read_only=True) == BackendSpec(
        "memory", size=4096, read_only=True
    )
    assert parse_backend_spec("/x/disk.raw") == BackendSpec("file", path="/x/disk.raw")
    assert parse_backend_spec("file:/x/d.raw", "2G").size == 2 << 30
    assert parse_backend_spec("file:/x/d.raw").path == "/x/d.raw"
    assert parse_backend_spec("nbd-disk.raw").kind == "file"  # only real NBD schemes are URIs
    spec = parse_backend_spec("nbd://h:5/e", "1G", read_only=True)
    assert spec == BackendSpec(
        "nbd", size=1 << 30, read_only=True, nbd=NbdTarget("e", host="h", port=5)
    )


def test_nbd_uris_with_tls() -> None:
    uri = "nbds://h/x?tls-certificates=/etc/pki/vfu"
    spec = parse_backend_spec(uri)
    assert spec.kind == "nbd" and spec.nbd is not None and spec.nbd.tls and spec.nbd.uri == uri
    psk = "nbds+unix://alice@/x?socket=/run/n.sock&tls-psk-file=/etc/vfu/keys.psk"
    assert parse_backend_spec(psk).nbd == NbdTarget("x", socket_path="/run/n.sock", tls=True)
    with pytest.raises(BackendSpecError, match="need nbds"):
        parse_backend_spec("nbd://h/x?tls-certificates=/d")
    with pytest.raises(BackendSpecError, match="unknown"):
        parse_backend_spec("nbds://h/x?tls-pretty-please=1")


@pytest.mark.parametrize(
    ("backing", "size", "why"),
    [
        (None, None, "--size is required"),
        (None, "12Q", "bad size"),
        ("http://h/disk", None, "unsupported backing"),
    ],
)
def test_parse_backend_spec_rejects(backing: str | None, size: str | None, why: str) -> None:
    with pytest.raises(BackendSpecError, match=why) as info:
        parse_backend_spec(backing, size)
    assert "\n" not in str(info.value)


def test_backing_io_is_for_files_only() -> None:
    assert parse_backend_spec("/x/d.raw").io == "sync"
    assert parse_backend_spec("/x/d.raw", io="uring") == BackendSpec("file", path="/x/d.raw", io="uring")
    with pytest.raises(BackendSpecError, match="bad --backing-io 'aio': expected one of sync, uring"):
        parse_backend_spec("/x/d.raw", io="aio")
    with pytest.raises(BackendSpecError, match="not a RAM disk"):
        parse_backend_spec(None, "1M", io="uring")
    with pytest.raises(BackendSpecError, match="not an NBD backing"):
        parse_backend_spec("nbd://h/e", io="uring")


async def test_open_backend_with_uring(tmp_path: Path) -> None:
    from vfu_server.block.uring import UringFileBackend

    path = tmp_path / "d.raw"
    async with open_backend(parse_backend_spec(str(path), "1M", io="uring")) as b:
        assert isinstance(b, UringFileBackend)
        await b.writev(0, [memoryview(b"uring" + bytes(507))])
    assert path.read_bytes()[:5] == b"uring"


def test_parse_backend_spec_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(BackendSpecError, match="directory"):
        parse_backend_spec(str(tmp_path))


async def test_open_backend_memory_and_file(tmp_path: Path) -> None:
    async with open_backend(None, size="64K") as b:
        assert isinstance(b, MemoryBackend)
        assert b.size == 64 << 10
    path = tmp_path / "d.raw"
    async with open_backend(str(path), size="1M") as b:
        assert isinstance(b, FileBackend)
        await b.writev(0, [memoryview(b"hello" + bytes(507))])
    async with open_backend(parse_backend_spec(str(path), read_only=True)) as b:
        assert b.read_only
        assert b.size == 1 << 20
        buf = bytearray(5)
        await b.readv(0, [memoryview(buf)])
        assert buf == b"hello"
