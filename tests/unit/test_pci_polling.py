"""The adaptive polling window (vfu_server.pci.polling), on a fake clock."""

from __future__ import annotations

import types

import pytest
import trio

from vfu_server.pci import polling
from vfu_server.pci.polling import START_NS, AdaptivePoll


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def perf_counter_ns(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(polling, "time", types.SimpleNamespace(perf_counter_ns=fake.perf_counter_ns))
    return fake


async def idle_then_woken(p: AdaptivePoll, clock: FakeClock, idle_ns: int) -> bool:
    """One idle period: the queue ran dry, nothing came while polling, the doorbell rang
    ``idle_ns`` after the queue ran dry. Returns what the poll returned."""
    start = clock.now

    def has_work() -> bool:
        clock.now += 1_000  # each look takes 1 us
        return clock.now - start >= idle_ns

    found = await p.poll(has_work, lambda: False)
    if not found:
        clock.now = max(clock.now, start + idle_ns)
        p.woken()
    return found


async def test_disabled_never_polls(clock: FakeClock) -> None:
    p = AdaptivePoll(0)
    for _ in range(10):
        assert not await idle_then_woken(p, clock, 1_000)
    assert p.window_ns == 0


async def test_window_grows_until_it_catches_the_driver(clock: FakeClock) -> None:
    p = AdaptivePoll(500_000)
    windows = []
    found = False
    for _ in range(12):
        found = await idle_then_woken(p, clock, 300_000)
        windows.append(p.window_ns)
        if found:
            break
    assert found, windows
    # 16 us doubling: 16, 32, ..., 256, then 500 (capped) catches a 300 us turn-around.
    assert windows[:5] == [START_NS, 2 * START_NS, 4 * START_NS, 8 * START_NS, 16 * START_NS]
    assert windows[-1] == 500_000
    # Once it catches, the window stays.
    for _ in range(5):
        assert await idle_then_woken(p, clock, 300_000)
    assert p.window_ns == 500_000


async def test_window_shrinks_to_zero_when_the_driver_is_slower_than_the_maximum(clock: FakeClock) -> None:
    p = AdaptivePoll(500_000)
    for _ in range(10):
        await idle_then_woken(p, clock, 100_000)
    assert p.window_ns > 100_000
    for _ in range(20):
        assert not await idle_then_woken(p, clock, 10_000_000)  # the guest went quiet
    assert p.window_ns == 0


async def test_ran_dry_without_polling_still_adapts(clock: FakeClock) -> None:
    """The NVMe doorbell runs an SQ inline without the queue task: ran_dry() + woken()."""
    p = AdaptivePoll(500_000)
    p.ran_dry()
    clock.now += 50_000
    p.woken()
    assert p.window_ns == START_NS
    p.woken()  # a second wake-up without an idle period changes nothing
    assert p.window_ns == START_NS


async def test_cancelled_poll_returns_false(clock: FakeClock) -> None:
    p = AdaptivePoll(500_000)
    p.window_ns = 500_000
    stop = False

    def has_work() -> bool:
        nonlocal stop
        stop = True
        return False

    assert not await p.poll(has_work, lambda: stop)


async def test_poll_lets_other_tasks_run() -> None:
    """Each look is a checkpoint: a task that produces the work runs while we poll."""
    p = AdaptivePoll(1_000_000_000)
    p.window_ns = 1_000_000_000
    work: list[int] = []
    async with trio.open_nursery() as nursery:
        async def producer() -> None:
            await trio.sleep(0.01)
            work.append(1)

        nursery.start_soon(producer)
        with trio.fail_after(5):
            assert await p.poll(lambda: bool(work), lambda: False)


async def test_no_polling_while_the_driver_keeps_falling_behind(clock: FakeClock) -> None:
    """A deep queue in a busy guest: its requests come while it still has completions to
    read, so looking for them only takes its CPU. Polling stops, and comes back when the
    driver waits for the device again."""
    p = AdaptivePoll(500_000)
    p.window_ns = 500_000
    looks = 0

    def has_work() -> bool:
        nonlocal looks
        looks += 1
        return True

    for _ in range(8):
        p.arrived(True)
    assert not await p.poll(has_work, lambda: False)
    assert looks == 0  # not one look
    assert p.window_ns == 500_000  # the window is kept for when polling comes back
    p.woken()
    for _ in range(16):
        p.arrived(False)
    assert await p.poll(has_work, lambda: False)
    assert looks == 1


async def test_an_occasional_late_driver_keeps_polling(clock: FakeClock) -> None:
    """Queue depth 1 with a driver that is now and then still reading: a late arrival costs
    the next two or three polls, no more."""
    p = AdaptivePoll(500_000)
    p.window_ns = 500_000
    skipped = 0
    for i in range(100):
        p.arrived(i % 10 == 0)
        skipped += not await p.poll(lambda: True, lambda: False)
    assert 0 < skipped <= 30
    assert p.behind <= polling.BEHIND_LIMIT


def test_negative_maximum_is_refused() -> None:
    with pytest.raises(ValueError):
        AdaptivePoll(-1)


def test_busy_look_deadline_follows_the_same_window(clock: FakeClock) -> None:
    # The vfio-user connection looks without checkpoints: spin_deadline/found/woken.
    p = AdaptivePoll(100_000)
    assert p.spin_deadline() == 0  # window still zero: sleep at once
    clock.now += 30_000
    p.woken()  # came back within the maximum: the window opens
    assert p.window_ns == START_NS
    assert p.spin_deadline() == clock.now + START_NS
    p.found()
    assert p.window_ns == START_NS and p.idle_since == 0
    for _ in range(10):
        p.spin_deadline()
        clock.now += 500_000
        p.woken()  # slower than the maximum every time
    assert p.window_ns == 0 and p.spin_deadline() == 0
    assert AdaptivePoll(0).spin_deadline() == 0
