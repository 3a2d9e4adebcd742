"""The fault rule syntax and engine (vfu_server.faults), without a device."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_devices.nvme.faults import NVME_FAULTS
from vfu_devices.virtio.blk import BLK_FAULTS
from vfu_devices.virtio.net import NET_FAULTS
from vfu_server import faults
from vfu_server.faults import FaultError, FaultSet, flip_bits, parse_rule


def test_parse_every_key() -> None:
    r = parse_rule("op=read|write, ns=2, lba=10-19, queue=3, every=4, prob=0.25, seed=9, count=5, "
                   "after=500ms, for=2m, status=media/0x81, dnr, more", NVME_FAULTS)
    assert r.ops == {1, 2} and r.ns == 2 and r.lba == (10, 19) and r.queue == 3
    assert (r.every, r.prob, r.seed, r.count) == (4, 0.25, 9, 5)
    assert (r.after, r.duration) == (0.5, 120.0)
    assert r.action == "status" and r.status == 0x281 | 1 << 14 | 1 << 13
    assert parse_rule("delay=250", NVME_FAULTS).delay_ms == 250
    assert parse_rule("delay=1.5s", NVME_FAULTS).delay_ms == 1500
    assert parse_rule("corrupt", NVME_FAULTS).bits == 1
    assert parse_rule("op=write,torn=1024,status=ok", NVME_FAULTS).torn_bytes == 1024
    assert parse_rule("status=0x4281", NVME_FAULTS).status == 0x4281
    assert parse_rule("status=ure", NVME_FAULTS).status == 0x281
    assert parse_rule("status=unsupp", BLK_FAULTS).status == 2
    assert parse_rule("op=tx,drop", NET_FAULTS).ops == {1}


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("op=read", "no action"), ("hang,fatal", "one action"), ("status=ok,hang", "one action"),
    ("op=bogus,hang", "unknown"), ("lba=5-2,hang", "below"), ("prob=0,hang", "(0, 1]"), ("every=0,hang", "1.."),
    ("dnr,hang", "goes with status"), ("hang=1", "no value"), ("status=9/1", "SCT"), ("status=0x8000", "15 bits"),
    ("delay=0", "1.."), ("delay=11m", "1.."), ("after=x,hang", "duration"), ("lba,hang", "needs a value"),
    ("wat=1,hang", "unknown key"), ("hang,,", "empty item"), ("hang,hang", "twice"), ("drop", "cannot do"),
])
def test_bad_rules_say_why(text: str, words: str) -> None:
    with pytest.raises(FaultError) as info:
        parse_rule(text, NVME_FAULTS)
    assert words in info.value.reason and info.value.errno in (22, 95)


def test_device_declares_what_it_can() -> None:
    with pytest.raises(FaultError, match="cannot match on 'lba'"):
        parse_rule("lba=1,drop", NET_FAULTS)
    with pytest.raises(FaultError, match="cannot do 'fatal'"):
        parse_rule("fatal", BLK_FAULTS)
    with pytest.raises(FaultError, match="no 'dnr' bit"):
        parse_rule("status=ioerr,dnr", BLK_FAULTS)


@given(st.text(max_size=80) | st.lists(st.sampled_from(
    ["op=read", "lba=1-2", "every=2", "prob=0.5", "hang", "status=ure", "dnr", "delay=5", "=", ",", "count=",
     "torn=9", "corrupt=0", "seed=x", "queue=70000", "ns=1"]), max_size=6).map(",".join))
def test_parse_never_fails_otherwise(text: str) -> None:
    for domain in (NVME_FAULTS, BLK_FAULTS, NET_FAULTS):
        try:
            rule = parse_rule(text, domain)
        except FaultError as exc:
            assert exc.reason
        else:
            assert rule.action in domain.actions


def test_match_every_prob_count_lba_and_queue() -> None:
    fs = FaultSet(NVME_FAULTS)
    assert not fs.active and fs.match(2) is None
    r = fs.add("op=read,lba=100-107,every=2,count=2,status=ure")
    assert fs.active
    hits = [fs.match(2, lba=lba, blocks=8) is not None for lba in (0, 93, 100, 107, 108, 104, 96, 100)]
    # matching: 93 (93..100), 100, 107, 104, 96, 100 -> every second of them, twice at most
    assert hits == [False, False, True, False, False, True, False, False]
    assert (r.seen, r.fired, r.spent) == (4, 2, True)
    fs.remove(r.id)
    assert not fs.active
    p = fs.add("prob=0.3,seed=5,queue=2,hang")
    rng = random.Random(5)
    expected = [rng.random() < 0.3 for _ in range(50)]
    assert [fs.match(1, queue=2) is not None for _ in range(50)] == expected
    assert fs.match(1, queue=1) is None and fs.match(1) is None
    assert p.seen == 50


def test_time_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    fs = FaultSet(NVME_FAULTS)
    fs.add("after=2s,for=3s,hang")
    assert fs.match(1) is None
    now[0] += 2
    assert fs.match(1) is not None
    now[0] += 2.9
    assert fs.match(1) is not None
    now[0] += 0.2
    assert fs.match(1) is None


def test_could_match_tells_fast_paths_when_to_step_aside() -> None:
    fs = FaultSet(NVME_FAULTS)
    fast = NVME_FAULTS.fast_ops
    fs.add("op=flush,status=internal")
    assert not fs.could_match(fast, 1), "a flush rule leaves reads and writes to C"
    rid = fs.add("op=read,queue=2,delay=5").id
    assert fs.could_match(fast, 2) and not fs.could_match(fast, 1)
    fs.remove(rid)
    assert not fs.could_match(fast, 2), "the answer is recomputed when the rules change"
    fs.add("op=write,count=1,corrupt")
    assert fs.could_match(fast, 1)
    assert fs.match(1) is not None
    assert not fs.could_match(fast, 1), "a spent rule gives the fast path back"


async def test_removing_a_rule_releases_what_it_holds() -> None:
    import trio

    fs = FaultSet(NVME_FAULTS)
    rule = fs.add("hang")
    released = []

    async def held() -> None:
        await rule.wait_removed()
        released.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(held)
        await trio.sleep(0.01)
        assert not released
        fs.clear()
    assert released == [True]
    with pytest.raises(FaultError, match="no rule"):
        fs.remove(rule.id)


def test_flip_bits_across_views() -> None:
    a, b = bytearray(3), bytearray(5)
    positions = flip_bits([memoryview(a), memoryview(b)], 64, random.Random(1))
    assert len(positions) == 64 and a == b"\xff" * 3 and b == b"\xff" * 5
    assert flip_bits([], 3, random.Random(1)) == []


class _Device:
    """What handle_control needs of a device: a name, its faults, maybe power_cut."""

    name = "stub"

    def __init__(self) -> None:
        self.faults = FaultSet(NVME_FAULTS)
        self.cuts: list[tuple[float, int]] = []

    async def power_cut(self, *, keep: float, seed: int) -> dict:  # type: ignore[type-arg]
        self.cuts.append((keep, seed))
        return {"kept_bytes": 0, "lost_bytes": 0}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


@given(st.fixed_dictionaries({"cmd": st.sampled_from([*sorted(faults.CONTROL_COMMANDS), "nope"])},
                             optional={"rule": json_values | st.sampled_from(["hang", "op=read,status=ure"]),
                                       "id": json_values | st.integers(0, 3), "keep": json_values,
                                       "seed": json_values}))
def test_control_requests_always_get_a_reply(msg: dict) -> None:  # type: ignore[type-arg]
    import trio

    device = _Device()
    before = [r.text for r in device.faults.rules()]
    reply = trio.run(faults.handle_control, device, msg)
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["errno"] and reply["reason"]
        assert [r.text for r in device.faults.rules()] == before and not device.cuts, "a refusal changes nothing"
