"""I/O statistics of real server processes on the control socket (``stats``, ``stats-reset``,
``stats-set-histogram``): counts exact per kind and queue, on the C fast path and on Python."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from vfu_server.client import Client, GuestRam
from vfu_server.testing import running_server
from vfu_server.testing.nvme import IO_FLUSH, IO_READ, NvmeTestDriver, SubmissionEntry
from vfu_server.testing.virtio import VIRTIO_F_EVENT_IDX, init_device

DISK = 4 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(port: int, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") -> tuple[bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def parse_metrics(body: bytes) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample, through prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def ask(path: str, *requests: dict) -> list[dict]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        for req in requests:
            await stream.send_all(json.dumps(req).encode() + b"\n")
        buf = b""
        while buf.count(b"\n") < len(requests):
            chunk = await stream.receive_some(1 << 20)
            assert chunk, "control socket closed early"
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def check_histograms(stats: dict) -> None:
    """Every queue's and the total's histograms hold exactly one entry per counted op."""
    nbins = len(stats["histogram_boundaries_ns"]) + 1
    for part in [stats["total"], *stats["queues"].values()]:
        for kind, ops in part["ops"].items():
            assert len(part["histogram"][kind]) == nbins
            assert sum(part["histogram"][kind]) == ops, (kind, part)
            assert (part["latency_ns_sum"][kind] > 0) == (ops > 0)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


@pytest.mark.parametrize("fastio", ["1", "0"], ids=["c-fast-path", "python"])
async def test_nvme_counts_exactly(tmp_path, image, fastio) -> None:
    ctl = str(tmp_path / "nvme.ctl")
    port = free_port()
    async with running_server("nvme", "--backing", str(image), "--control-socket", ctl,
                              "--metrics", f"127.0.0.1:{port}", env={"VFU_FASTIO": fastio}) as srv, \
            await Client.connect(srv.socket_path) as client:
        with GuestRam(32 << 20) as ram:
            drv = NvmeTestDriver(client, ram)
            await drv.start()
            await drv.create_io_queue_pair(1, entries=64)
            (before,) = await ask(ctl, {"cmd": "stats", "id": 7})
            assert before["ok"] and before["id"] == 7 and before["device"] == "nvme"
            assert before["stats"]["total"]["ops"]["read"] == 0
            for i in range(20):
                await drv.write(1, i * 8, os.urandom(4096))
            for i in range(30):
                await drv.read(1, i * 16, 8192)
            # A batch submitted at once (one doorbell): C takes them in one run.
            bufs = [drv.buffer(4096) for _ in range(16)]
            cids = []
            for n, buf in enumerate(bufs):
                prp1, prp2 = drv.prps(buf, 4096)
                cids.append(await drv.submit(1, SubmissionEntry(IO_READ, nsid=1, cdw10=n * 8, cdw12=7,
                                                                 prp1=prp1, prp2=prp2), ring=n == 15))
            for cid in cids:
                assert (await drv.wait(1, cid)).ok
            await drv.io(1, IO_FLUSH, check=True)
            bad = await drv.io(1, IO_READ, slba=DISK // 512, nlb=0, buf=drv.buffer(512), length=512)
            assert not bad.ok
            (reply,) = await ask(ctl, {"cmd": "stats"})
            head, body = await scrape(port)
            assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=" in head
            bad_head, _ = await scrape(port, b"GET /other HTTP/1.1\r\n\r\n")
            garbage_head, _ = await scrape(port, b"\x00\xff garbage\r\n\r\n")
            assert bad_head.startswith(b"HTTP/1.1 404") and garbage_head.startswith(b"HTTP/1.1 400")
        stats = reply["stats"]
        total = stats["total"]
        metrics = parse_metrics(body)
        label = (("device", "nvme"), ("kind", "read"), ("queue", "sq1"))
        assert metrics["vfu_io_ops_total"][label] == total["ops"]["read"]
        assert metrics["vfu_io_bytes_total"][label] == total["bytes"]["read"]
        assert metrics["vfu_io_latency_seconds_count"][label] == total["ops"]["read"]
        assert metrics["vfu_io_latency_seconds_bucket"][(*label[:2], ("le", "+Inf"), label[2])] == total["ops"]["read"]
        assert metrics["vfu_io_errors_total"][(("device", "nvme"), ("queue", "sq1"),
                                               ("status", f"{bad.status:#06x}"))] == 1
        assert metrics["vfu_io_in_flight"][(("device", "nvme"), ("queue", "sq1"))] == 0
        assert total["ops"] == {"read": 30 + 16 + 1, "write": 20, "flush": 1, "discard": 0,
                                "write_zeroes": 0, "other": 0}
        assert total["bytes"]["read"] == 30 * 8192 + 16 * 4096, "a failed read moves no bytes"
        assert total["bytes"]["write"] == 20 * 4096
        assert total["errors"] == {f"{bad.status:#06x}": 1}
        assert total["in_flight"] == 0
        assert list(stats["queues"]) == ["sq1"], "I/O queues only; the admin queue is not counted"
        check_histograms(stats)

        # New boundaries restart the histograms (not the counts); bad ones are refused.
        bad_bounds, set_bounds, reset = await ask(
            ctl,
            {"cmd": "stats-set-histogram", "boundaries_ns": [5000, 1000]},
            {"cmd": "stats-set-histogram", "boundaries_ns": [1000, 1_000_000_000]},
            {"cmd": "stats-reset"},
        )
        assert not bad_bounds["ok"] and bad_bounds["error"] == "EINVAL" and bad_bounds["reason"]
        after = set_bounds["stats"]
        assert after["histogram_boundaries_ns"] == [1000, 1_000_000_000]
        assert after["total"]["ops"] == total["ops"]
        assert all(sum(h) == 0 for h in after["total"]["histogram"].values())
        assert reset["ok"] and all(n == 0 for n in reset["stats"]["total"]["ops"].values())
        assert reset["stats"]["total"]["errors"] == {}


@pytest.mark.parametrize("fastio", ["1", "0"], ids=["c-fast-path", "python"])
async def test_virtio_blk_counts_exactly(tmp_path, image, fastio) -> None:
    from test_virtio_blk import ALL, T_FLUSH, hdr, read_req, status, write_req

    ctl = str(tmp_path / "blk.ctl")
    async with running_server("virtio-blk", "--backing", str(image), "--num-queues", "2",
                              "--control-socket", ctl, env={"VFU_FASTIO": fastio}) as srv, \
            await Client.connect(srv.socket_path) as client:
        with GuestRam(16 << 20) as ram:
            await client.dma_map(ram)
            _, (q0, q1) = await init_device(client, ram, ALL | VIRTIO_F_EVENT_IDX, queues=(0, 1),
                                            slot_size=16384)
            reqs = [write_req(q0, i * 8, os.urandom(4096)) for i in range(10)]
            reqs += [read_req(q1, i * 16, 8192) for i in range(12)]
            reqs.append(q0.add([hdr(T_FLUSH)], [1]))
            reqs.append(read_req(q1, DISK // 512, 512))  # beyond the disk: IOERR
            await q0.kick()
            await q1.kick()
            await q0.wait_used(11)
            await q1.wait_used(13)
            assert [status(r) for r in reqs] == [0] * 23 + [1]
            (reply,) = await ask(ctl, {"cmd": "stats"})
    stats = reply["stats"]
    q0s, q1s = stats["queues"]["q0"], stats["queues"]["q1"]
    assert (q0s["ops"]["write"], q0s["bytes"]["write"], q0s["ops"]["flush"]) == (10, 40960, 1)
    assert (q1s["ops"]["read"], q1s["bytes"]["read"]) == (13, 12 * 8192)
    assert q1s["errors"] == {"IOERR": 1} and q0s["errors"] == {}
    assert stats["total"]["ops"]["read"] == 13 and stats["total"]["ops"]["write"] == 10
    check_histograms(stats)


async def test_stats_of_a_device_without_them(tmp_path) -> None:
    ctl = str(tmp_path / "ex.ctl")
    async with running_server("example", "--control-socket", ctl):
        (reply,) = await ask(ctl, {"cmd": "stats"})
    assert not reply["ok"] and reply["error"] == "ENOTSUP" and "no I/O statistics" in reply["reason"]


async def test_top_shows_servers_and_one_that_is_gone(tmp_path, image) -> None:
    from test_virtio_blk import read_req

    ctl = str(tmp_path / "blk.ctl")
    async with running_server("virtio-blk", "--backing", str(image), "--control-socket", ctl) as srv, \
            await Client.connect(srv.socket_path) as client:
        with GuestRam(16 << 20) as ram:
            await client.dma_map(ram)
            _, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX, slot_size=16384)
            for i in range(8):
                read_req(q, i * 8, 4096)
            await q.kick()
            await q.wait_used(8)
            out = await trio.run_process(
                [sys.executable, "-m", "vfu_server", "top", ctl, str(tmp_path / "gone.ctl"),
                 "--once", "--interval", "0.2"], capture_stdout=True, capture_stderr=True,
                env={**os.environ, "COLUMNS": "200"})
    text = out.stdout.decode()
    lines = text.splitlines()
    row = next(line for line in lines if "blk.ctl" in line and " total " in line and " read " in line)
    assert row.split("│")[-2].strip().startswith("<="), "p99 from the histogram"
    assert any("gone.ctl" in line and "No such file" in line for line in lines), text


async def test_virtio_net_counts_packets_and_bytes(tmp_path) -> None:
    from test_virtio_net import GUEST_MAC, HDR, fill_rx, frame, peer_device, setup_net

    ctl = str(tmp_path / "net.ctl")
    async with peer_device(tmp_path, "--mac", "52:54:00:12:34:56", "--control-socket", ctl) as (
            _srv, client, peer, _lsock):
        _dev, (rx, tx, _cq) = await setup_net(client)
        for i in range(20):
            tx.add([HDR + frame(b"\x02" * 6, GUEST_MAC, i, size=200)])
        await tx.kick()
        await tx.wait_used(20)
        for _ in range(20):
            await peer.recv(65536)
        fill_rx(rx, 32)
        await rx.kick()
        for i in range(15):
            await peer.send(frame(GUEST_MAC, b"\x02" * 6, i, size=300))
        got = 0
        with trio.fail_after(30):
            while got < 15:
                got += len(await rx.wait_used(1))
        (reply,) = await ask(ctl, {"cmd": "stats"})
    stats = reply["stats"]
    assert "histogram_boundaries_ns" not in stats, "packets have no latency here"
    tx0, rx0 = stats["queues"]["tx0"], stats["queues"]["rx0"]
    assert (tx0["ops"]["tx"], tx0["bytes"]["tx"]) == (20, 20 * (14 + 200))
    assert (rx0["ops"]["rx"], rx0["bytes"]["rx"]) == (15, 15 * (14 + 300))
    assert stats["total"]["errors"] == {}


def test_metrics_address_errors_are_one_line(tmp_path) -> None:
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for device, addr, why in (("nvme", f"127.0.0.1:{port}", "cannot listen"),
                                  ("nvme", "localhost", "expected ADDR:PORT"),
                                  ("example", "127.0.0.1:0", "keeps no I/O statistics")):
            out = subprocess.run([sys.executable, "-m", "vfu_server", device, "--socket-path",
                                  str(tmp_path / "d.sock"), "--metrics", addr],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 2 and out.stdout == ""
            assert len(out.stderr.strip().splitlines()) == 1 and why in out.stderr, out.stderr
