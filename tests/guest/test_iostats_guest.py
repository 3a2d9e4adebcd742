"""I/O statistics under the Linux NVMe and virtio-blk drivers: fio in the guest writes and reads a
known number of I/Os (O_DIRECT, psync, one request per I/O) and the server's counters agree
exactly with the guest's own ``/sys/block/DEV/stat``; the Prometheus exposition scraped meanwhile
parses."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import trio

from vfu_guest import GuestKit, VfuDevice, run_guest_async
from vfu_guest.tools import fio_files

REPO_ROOT = Path(__file__).resolve().parents[2]
DISK = 32 << 20
N = 256  # I/Os of each kind the workload makes

SCRIPT = r"""
vfu_wait_dev /dev/__DEV__ 30 || { dmesg | tail -40; exit 10; }
echo "before=$(cat /sys/block/__DEV__/stat | tr -s ' ' ',' | sed 's/^,//')"
fio --name=w --filename=/dev/__DEV__ --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
    --offset=2M --size=8M --number_ios=__N__ --randrepeat=1 --output=/dev/null && echo write=ok
fio --name=r --filename=/dev/__DEV__ --rw=randread --bs=32k --direct=1 --ioengine=psync \
    --offset=2M --size=8M --number_ios=__N__ --randrepeat=1 --output=/dev/null && echo read=ok
echo "after=$(cat /sys/block/__DEV__/stat | tr -s ' ' ',' | sed 's/^,//')"
"""


def _stat(text: str) -> dict[str, int]:
    f = [int(x) for x in text.split(",")]
    return {"reads": f[0], "read_sectors": f[2], "writes": f[4], "write_sectors": f[6],
            "flushes": f[15] if len(f) > 15 else 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _scrape(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body.decode()


@pytest.mark.guest
@pytest.mark.parametrize(("device", "dev"), [("nvme", "nvme0n1"), ("virtio-blk", "vda")])
async def test_stats_agree_with_the_guest(guest_kit: GuestKit, tmp_path: Path, device: str, dev: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(DISK))
    port = _free_port()
    server = VfuDevice(device, ["--backing", str(image), "--log-level", "info", "--metrics", f"127.0.0.1:{port}"],
                       cwd=str(REPO_ROOT))
    scrapes: list[str] = []
    async with trio.open_nursery() as nursery:
        async def scraper() -> None:
            while True:
                try:
                    scrapes.append(await _scrape(port))
                except OSError:
                    pass  # not up yet, or gone
                await trio.sleep(0.5)

        nursery.start_soon(scraper)
        script = SCRIPT.replace("__DEV__", dev).replace("__N__", str(N))
        result = await run_guest_async(script, [server], kit=guest_kit, timeout=400, memory_mib=768,
                                       extra_files={k: str(v) for k, v in fio_files().items()})
        nursery.cancel_scope.cancel()
    facts = result.values()
    assert facts.get("write") == "ok" and facts.get("read") == "ok", result.output
    before, after = _stat(facts["before"]), _stat(facts["after"])
    # The workload is what we think it is: one request per fio I/O.
    assert after["writes"] - before["writes"] == N and after["reads"] - before["reads"] == N

    stderr = result.servers["vu0"].stderr
    match = re.search(r"I/O statistics at exit: (\{.*\})", stderr)
    assert match, stderr[-3000:]
    total = json.loads(match.group(1))["total"]
    # Everything the guest's block layer completed on this disk (the kernel's partition scan
    # included), as the device counted it.
    assert total["ops"]["read"] == after["reads"]
    assert total["bytes"]["read"] == after["read_sectors"] * 512
    assert total["ops"]["write"] == after["writes"]
    assert total["bytes"]["write"] == after["write_sectors"] * 512
    assert total["ops"]["flush"] == after["flushes"]
    assert total["errors"] == {} and total["in_flight"] == 0
    for kind, ops in total["ops"].items():
        assert sum(total["histogram"][kind]) == ops, kind

    assert scrapes, "no scrape answered while the guest ran"
    for family in text_string_to_metric_families(scrapes[-1]):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        if family.name == "vfu_io_latency_seconds":
            for (name, labels), value in samples.items():
                if name.endswith("_count"):
                    inf = dict(labels) | {"le": "+Inf"}
                    assert samples[(f"{family.name}_bucket", tuple(sorted(inf.items())))] == value
