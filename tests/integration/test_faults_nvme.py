"""NVMe fault rules and power loss, through real server processes: rules from --fault and from
the control socket (vfu_server.faults.FaultControl), every action and match, bad rules, rules
removed while I/O runs, and --volatile-cache with power-cut."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vfu_devices.nvme.constants import CSTS_CFS, DNR, Status
from vfu_server.faults import FaultControl, FaultError
from vfu_server.testing.nvme import IO_FLUSH, IO_READ, IO_WRITE, SubmissionEntry, nvme_session

DISK = 1 << 20
URE = Status.UNRECOVERED_READ_ERROR


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


@asynccontextmanager
async def nvme_faults(image: Path, tmp_path: Path, *args: str) -> AsyncIterator[tuple[Any, Any, FaultControl, Any]]:
    """An NVMe server on ``image`` with a control socket: (driver, I/O queue 1, FaultControl, server)."""
    ctl = str(tmp_path / "ctl")
    async with nvme_session("--backing", str(image), "--control-socket", ctl, *args) as (drv, server), \
            FaultControl(ctl) as fc:
        yield drv, await drv.create_io_queue_pair(1, entries=32), fc, server


def read_entry(drv, slba: int, nlb: int = 1, nsid: int = 1) -> tuple[SubmissionEntry, int]:
    buf = drv.buffer(nlb * 512)
    prp1, prp2 = drv.prps(buf, nlb * 512)
    return SubmissionEntry(IO_READ, nsid=nsid, cdw10=slba, cdw12=nlb - 1, prp1=prp1, prp2=prp2), buf


async def read_status(drv, q, slba: int, nlb: int = 1, nsid: int = 1) -> int:
    entry, _ = read_entry(drv, slba, nlb, nsid)
    return (await drv.command(q, entry)).status


async def test_status_rule_from_command_line_hits_one_lba_only(image: Path, tmp_path: Path) -> None:
    """op=read,lba=8,status=ure: reads that touch LBA 8 fail with Unrecovered Read Error (the
    C fast path steps aside), everything else is untouched; the error log records it."""
    ctl = str(tmp_path / "ctl")
    async with nvme_session("--backing", str(image), "--control-socket", ctl,
                            "--fault", "op=read,lba=8,status=ure,dnr") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=32)
        original = image.read_bytes()
        assert await drv.read(q, 0, 4096) == original[:4096]  # LBAs 0-7
        status = await read_status(drv, q, 8)
        assert status & 0x7FF == URE and status & DNR
        assert await read_status(drv, q, 6, nlb=4) & 0x7FF == URE, "a range that overlaps LBA 8"
        assert await drv.read(q, 9, 512) == original[9 * 512 : 10 * 512]
        await drv.write(q, 8, b"w" * 512)  # writes are not matched
        async with FaultControl(ctl) as fc:
            listed = await fc.list()
            assert [r["fired"] for r in listed["rules"]] == [2]
            assert listed["domain"]["device"] == "nvme"
            assert await fc.fired() == {1: 2}


async def test_status_bits_more_and_sct_forms(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        rid = await fc.add("op=read,lba=3,status=media/0x81,more")
        status = await read_status(drv, q, 3)
        assert status & 0x7FF == 0x281 and status & (1 << 13) and not status & DNR
        await fc.remove(rid)
        await fc.add("op=write,status=1/0x80")
        c = await drv.io(q, IO_WRITE, slba=0, nlb=0, buf=drv.buffer(512), length=512)
        assert c.code == 0x180


async def test_bad_rules_are_refused_and_change_nothing(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    async with nvme_session("--backing", str(image), "--control-socket", ctl) as (drv, _), \
            FaultControl(ctl) as fc:
        bad = ["", "op=read", "op=read,status=ure,hang", "op=nosuch,hang", "lba=9-3,hang",
               "prob=2,hang", "status=media/0x1ff", "drop", "hang=3", "dnr,hang", "every=0,hang",
               "delay=0", "op=read,op=write,hang", "after=soon,hang", "ns=0,hang", "frobnicate=1,hang"]
        for text in bad:
            reply = await fc.request({"cmd": "fault-add", "rule": text})
            assert not reply["ok"] and reply["errno"] in (22, 95) and reply["reason"], (text, reply)
        for req in ({"cmd": "fault-add"}, {"cmd": "fault-remove", "id": 99}, {"cmd": "fault-remove", "id": "x"},
                    {"cmd": "power-cut", "keep": 3}):
            reply = await fc.request(req)
            assert not reply["ok"] and reply["reason"], req
        assert (await fc.list())["rules"] == []
        q = await drv.create_io_queue_pair(1, entries=32)
        assert await drv.read(q, 0, 512) == image.read_bytes()[:512]


def test_bad_fault_on_command_line_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vfu_server", "nvme", "--socket-path", str(tmp_path / "s"),
                           "--fault", "op=read,drop"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot do 'drop'" in proc.stderr
    assert not (tmp_path / "s").exists()


async def test_hang_holds_until_removed_and_reset_drops_it(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        rid = await fc.add("op=read,lba=5,hang")
        entry, buf = read_entry(drv, 5)
        cid = await drv.submit(q, entry)
        assert await drv.read(q, 6, 512) == image.read_bytes()[6 * 512 : 7 * 512], "others go on"
        await drv.reap(q)
        assert cid not in q.done
        await fc.remove(rid)  # releases the held command: it runs now
        assert (await drv.wait(q, cid)).ok
        assert drv.ram.read(buf, 512) == image.read_bytes()[5 * 512 : 6 * 512]

        await fc.add("op=read,lba=5,hang")
        cid = await drv.submit(q, read_entry(drv, 5)[0])
        await drv.disable()  # the reset drops the held command, promptly
        await drv.enable()
        q = await drv.create_io_queue_pair(1, entries=32)
        assert cid not in q.done
        assert await drv.read(q, 6, 512) == image.read_bytes()[6 * 512 : 7 * 512]


async def test_hang_dropped_when_its_queue_is_deleted(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        await fc.add("queue=1,hang")
        await drv.submit(q, read_entry(drv, 0)[0])
        await drv.delete_io_queue_pair(1)  # would wait forever for the held command
        q = await drv.create_io_queue_pair(2, entries=32)
        assert await drv.read(q, 0, 512) == image.read_bytes()[:512], "queue 2 is not matched"


async def test_delay_completes_later_than_a_younger_command(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        await fc.add("op=read,lba=1,delay=3s")
        slow = await drv.submit(q, read_entry(drv, 1)[0])
        fast = await drv.submit(q, read_entry(drv, 2)[0])
        assert (await drv.wait(q, fast)).ok
        assert slow not in q.done
        assert (await drv.wait(q, slow, timeout=30)).ok


async def test_corrupt_flips_exactly_the_bits_asked(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        original = image.read_bytes()[:4096]
        await fc.add("op=read,lba=0,corrupt=5,seed=3")
        got = await drv.read(q, 0, 4096)
        assert sum(bin(a ^ b).count("1") for a, b in zip(got, original, strict=True)) == 5
        await fc.remove("all")
        await fc.add("op=write,corrupt")
        data = os.urandom(1024)
        await drv.write(q, 16, data, fua=True)
        stored = image.read_bytes()[16 * 512 : 16 * 512 + 1024]
        assert sum(bin(a ^ b).count("1") for a, b in zip(stored, data, strict=True)) == 1


async def test_torn_write_stores_only_the_first_part(image: Path, tmp_path: Path) -> None:
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        before = image.read_bytes()[:4096]
        await fc.add("op=write,torn=1536")
        data = os.urandom(4096)
        buf = drv.buffer(4096)
        drv.ram.write(buf, data)
        c = await drv.io(q, IO_WRITE, slba=0, nlb=7, buf=buf, length=4096, cdw12_extra=1 << 30)
        assert c.code == Status.WRITE_FAULT and not c.dnr
        after = image.read_bytes()[:4096]
        assert after[:1536] == data[:1536] and after[1536:] == before[1536:]


async def test_fatal_sets_cfs_and_reset_recovers(image: Path, tmp_path: Path) -> None:
    for action, cfs in (("fatal", CSTS_CFS), ("reset", 0)):
        ctl = str(tmp_path / f"ctl-{action}")
        async with nvme_session("--backing", str(image), "--control-socket", ctl) as (drv, _), \
                FaultControl(ctl) as fc:
            q = await drv.create_io_queue_pair(1, entries=32)
            await fc.add(f"op=write,count=1,{action}")
            cid = await drv.submit(q, SubmissionEntry(IO_WRITE, nsid=1, prp1=drv.buffer(512)))
            if cfs:
                await drv.wait_csts(CSTS_CFS, CSTS_CFS)
            later = await drv.submit(q, read_entry(drv, 0)[0])
            with trio.move_on_after(0.5):
                await drv.wait(q, later)
            assert later not in q.done and cid not in q.done, "I/O stops until the reset"
            assert (await drv.admin(0x06, nsid=0, cdw10=1, prp1=drv.buffer(4096))).ok, "admin still answers"
            await drv.disable()
            await drv.enable()
            q = await drv.create_io_queue_pair(1, entries=32)
            assert await drv.read(q, 0, 512) == image.read_bytes()[:512]
            assert (await fc.list())["rules"][0]["spent"]


async def test_matches_every_count_prob_queue_ns_and_window(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    async with nvme_session("--namespaces", "2", "--size", "1M", "--control-socket", ctl) as (drv, _), \
            FaultControl(ctl) as fc:
        q1 = await drv.create_io_queue_pair(1, entries=32)
        q2 = await drv.create_io_queue_pair(2, entries=32)

        async def failing(q, n: int, **kw: int) -> list[int]:
            return [i for i in range(n) if await read_status(drv, q, 0, **kw)]

        rid = await fc.add("every=3,status=internal")
        assert await failing(q1, 9) == [2, 5, 8]
        await fc.remove(rid)
        rid = await fc.add("count=2,status=internal")
        assert await failing(q1, 5) == [0, 1]
        await fc.remove(rid)
        rid = await fc.add("prob=0.5,seed=42,status=internal")
        rng = random.Random(42)
        assert await failing(q1, 30) == [i for i in range(30) if rng.random() < 0.5]
        await fc.remove(rid)
        rid = await fc.add("queue=2,status=internal")
        assert await failing(q1, 3) == [] and await failing(q2, 3) == [0, 1, 2]
        await fc.remove(rid)
        rid = await fc.add("ns=2,status=internal")
        assert await failing(q1, 2, nsid=1) == [] and await failing(q1, 2, nsid=2) == [0, 1]
        await fc.remove(rid)
        rid = await fc.add("after=1h,status=internal")
        assert await failing(q1, 3) == []
        assert (await fc.list())["rules"][0]["seen"] == 0, "outside its window a rule does not look"
        await fc.remove(rid)
        await fc.add("op=flush,status=internal")
        assert await failing(q1, 2) == [], "reads are not flushes"
        assert not (await drv.io(q1, IO_FLUSH)).ok


async def test_rules_added_and_removed_while_io_runs(image: Path, tmp_path: Path) -> None:
    """Readers keep going while a rule that fails every read comes and goes; after it went,
    every read succeeds again with the right data, and the server never stumbles."""
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with nvme_session("--backing", str(image), "--control-socket", ctl) as (drv, server), \
            FaultControl(ctl) as fc:
        q = await drv.create_io_queue_pair(1, entries=64)
        failed = 0
        stop = False

        async def readers() -> None:
            # Eight reads in flight at a time (one task: the test driver waits in one place).
            nonlocal failed
            batch = [(lba, *read_entry(drv, lba)) for lba in range(8)]  # buffers reused
            while not stop:
                cids = [(lba, await drv.submit(q, entry), buf) for lba, entry, buf in batch]
                for lba, cid, buf in cids:
                    c = await drv.wait(q, cid)
                    if c.ok:
                        assert drv.ram.read(buf, 512) == original[lba * 512 : (lba + 1) * 512]
                    else:
                        assert c.code == 0x6
                        failed += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(readers)
            for _ in range(5):
                rid = await fc.add("op=read,status=internal")
                await trio.sleep(0.05)
                await fc.remove(rid)
                await trio.sleep(0.05)
            rid = await fc.add("op=read,hang")
            await trio.sleep(0.05)
            await fc.remove(rid)  # what it held runs now
            stop = True
        assert failed > 0
        for lba in range(8):
            assert await drv.read(q, lba, 512) == original[lba * 512 : (lba + 1) * 512]
        assert server.process.returncode is None and "Traceback" not in server.stderr()


async def test_power_cut_loses_only_unflushed_writes(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with nvme_session("--backing", str(image), "--volatile-cache", "--control-socket", ctl) as (drv, _), \
            FaultControl(ctl) as fc:
        q = await drv.create_io_queue_pair(1, entries=32)
        flushed, fua, lost = os.urandom(4096), os.urandom(4096), os.urandom(4096)
        await drv.write(q, 0, flushed)
        assert (await drv.io(q, IO_FLUSH)).ok
        await drv.write(q, 8, fua, fua=True)
        await drv.write(q, 16, lost)
        assert await drv.read(q, 16, 4096) == lost, "the cache is read back"
        assert image.read_bytes()[16 * 512 : 24 * 512] == original[16 * 512 : 24 * 512], "not yet on media"
        ident = await drv.identify(1)
        assert ident[525] & 1, "VWC: a volatile write cache is present"

        cut = await fc.power_cut()
        assert cut["lost_bytes"] == 4096 and cut["kept_bytes"] == 0
        csts = await drv.csts()
        assert csts & CSTS_CFS and not csts & 1, "not ready until the driver resets it"
        await drv.disable()
        await drv.enable()
        q = await drv.create_io_queue_pair(1, entries=32)
        assert await drv.read(q, 0, 4096) == flushed
        assert await drv.read(q, 8, 4096) == fua
        assert await drv.read(q, 16, 4096) == original[16 * 512 : 24 * 512]

        # keep=1: everything cached reached the media before the power went.
        await drv.write(q, 32, lost)
        assert (await fc.power_cut(keep=1.0))["kept_bytes"] == 4096
        await drv.disable()
        await drv.enable()
        q = await drv.create_io_queue_pair(1, entries=32)
        assert await drv.read(q, 32, 4096) == lost

        # The driver turned the write cache off (Set Features VWC = 0): every write is durable.
        assert (await drv.set_feature(0x06, 0)).ok
        through = os.urandom(4096)
        await drv.write(q, 48, through)
        assert (await fc.power_cut())["lost_bytes"] == 0
        await drv.disable()
        await drv.enable()
        q = await drv.create_io_queue_pair(1, entries=32)
        assert await drv.read(q, 48, 4096) == through
        with pytest.raises(FaultError):
            await fc.power_cut(keep=-1)


def erri_entries(*entries: tuple[int, int, int]) -> bytes:
    """OCP Error Injection entries: (flags, type, NRTDP), 32 bytes each."""
    return b"".join(struct.pack("<BxHH26x", flags, etype, nrtdp) for flags, etype, nrtdp in entries)


async def set_erri(drv, *entries: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    buf = drv.buffer(4096)
    drv.ram.write(buf, erri_entries(*entries).ljust(32, b"\0"))
    return await drv.admin(0x09, cdw10=0xC0, cdw11=len(entries), prp1=buf)


async def get_erri(drv) -> tuple[int, list[tuple[int, int, int]]]:  # type: ignore[no-untyped-def]
    buf = drv.buffer(4096)
    c = await drv.admin(0x0A, cdw10=0xC0, prp1=buf)
    assert c.ok
    data = drv.ram.read(buf, 4096)
    return c.dw0, [struct.unpack_from("<BxHH", data, i * 32) for i in range(c.dw0)]


async def test_ocp_error_injection_feature(image: Path, tmp_path: Path) -> None:
    """Set/Get Features C0h (what `nvme ocp set-error-injection -N` sends) become fault rules."""
    async with nvme_faults(image, tmp_path) as (drv, q, fc, _):
        assert (await set_erri(drv, (1, 7, 0))).ok  # NAND corruption, enabled, repeating
        assert await read_status(drv, q, 0) & 0x7FF == URE
        assert await read_status(drv, q, 9) & 0x7FF == URE
        assert await get_erri(drv) == (1, [(1, 7, 0)])
        assert [r["rule"] for r in (await fc.list())["rules"]] == ["op=read,status=ure"]

        assert (await set_erri(drv, (3, 15, 0), (0, 16, 0))).ok  # a single I/O failure; one disabled
        assert [r["rule"] for r in (await fc.list())["rules"]] == ["op=read|write,status=internal,count=1"]
        assert await read_status(drv, q, 0) & 0x7FF == Status.INTERNAL_ERROR
        assert await read_status(drv, q, 0) == 0
        assert await get_erri(drv) == (2, [(2, 15, 0), (0, 16, 0)]), "a fired single instance reads disabled"

        c = await set_erri(drv, (1, 3, 0))  # PLP defect: nothing here to map it onto
        assert c.code == Status.INVALID_FIELD
        assert (await get_erri(drv))[0] == 2, "a refused Set changes nothing"

        assert (await set_erri(drv, (1, 4, 3))).ok  # firmware error after 3 reads: CSTS.CFS
        for _ in range(2):
            assert await read_status(drv, q, 0) == 0
        await drv.submit(q, read_entry(drv, 0)[0])
        await drv.wait_csts(CSTS_CFS, CSTS_CFS)
        await drv.disable()
        await drv.enable()
        assert (await set_erri(drv)).ok
        assert (await fc.list())["rules"] == [] and await get_erri(drv) == (0, [])


async def test_every_action_at_once_under_load_then_resets(image: Path, tmp_path: Path) -> None:
    """Rules of every kind fire at random while reads and writes run on two queues and the
    controller is reset twice under them: the server answers throughout, never logs a
    traceback, and with the rules gone every command completes normally again."""
    ctl = str(tmp_path / "ctl")
    rules = ["op=read,prob=0.05,seed=1,status=ure", "op=write,prob=0.05,seed=2,torn", "prob=0.05,seed=3,delay=30",
             "op=read,prob=0.05,seed=4,corrupt=3", "op=write,prob=0.05,seed=5,corrupt", "prob=0.02,seed=6,hang",
             "op=write,every=97,fatal", "op=read,every=89,reset", "op=flush,prob=0.5,seed=7,status=internal,more"]
    async with nvme_session("--backing", str(image), "--control-socket", ctl) as (drv, server), \
            FaultControl(ctl) as fc:
        for text in rules:
            await fc.add(text)
        for _round in range(3):
            queues = [await drv.create_io_queue_pair(qid, entries=32) for qid in (1, 2)]
            submitted = []
            for i in range(48):
                q = queues[i % 2]
                if i % 3 == 0:
                    entry = SubmissionEntry(IO_WRITE, nsid=1, cdw10=i * 8, cdw12=7, prp1=drv.buffer(4096))
                elif i % 7 == 0:
                    entry = SubmissionEntry(IO_FLUSH, nsid=1)
                else:
                    entry = read_entry(drv, i * 8, 8)[0]
                submitted.append((q, await drv.submit(q, entry)))
            with trio.move_on_after(2):
                for q, cid in submitted:
                    await drv.wait(q, cid)
            await drv.disable()  # whatever is held, halted or delayed: dropped
            await drv.enable()
        fired = await fc.fired()
        assert sum(fired.values()) > 10, fired
        await fc.remove("all")
        q = await drv.create_io_queue_pair(1, entries=32)
        data = os.urandom(4096)
        await drv.write(q, 0, data)
        assert await drv.read(q, 0, 4096) == data
        assert server.process.returncode is None and "Traceback" not in server.stderr()


async def test_statistics_count_faulted_commands_as_the_guest_saw_them(image: Path, tmp_path: Path) -> None:
    """A rule's status is an error of that status, a corrupted read a read done, a command a
    hang rule holds is in flight, and dropped by a reset it is an error 'dropped'."""
    async with nvme_faults(image, tmp_path, "--fault", "op=read,lba=8,count=1,status=ure",
                           "--fault", "op=read,lba=16,count=1,corrupt") as (drv, q, fc, _):
        assert await read_status(drv, q, 8) & 0x7FF == URE
        assert await read_status(drv, q, 16) == 0
        await fc.add("op=read,lba=24,hang")
        entry, _ = read_entry(drv, 24)
        await drv.submit(q, entry)
        await trio.sleep(0.2)
        sq1 = (await fc.request({"cmd": "stats"}))["stats"]["queues"]["sq1"]
        assert sq1["ops"]["read"] == 2 and sq1["bytes"]["read"] == 512, sq1
        assert sq1["errors"] == {f"{URE:#06x}": 1} and sq1["in_flight"] == 1, sq1
        await drv.disable()  # the reset drops the held read
        sq1 = (await fc.request({"cmd": "stats"}))["stats"]["queues"]["sq1"]
        assert sq1["errors"].get("dropped") == 1 and sq1["in_flight"] == 0 and sq1["ops"]["read"] == 2, sq1
