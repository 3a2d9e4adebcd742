"""vfu_server.iostats: counting, snapshots, boundaries, and the control commands on any input."""

from __future__ import annotations

from bisect import bisect_right

from hypothesis import given, settings
from hypothesis import strategies as st

from devices._fastio_build import HELPER
from vfu_server.iostats import (
    BLOCK_KINDS,
    MAX_BOUNDS,
    READ,
    WRITE,
    IoStats,
    check_bounds,
    handle_control,
)


class Dev:
    name = "dev"

    def __init__(self) -> None:
        self.iostats = IoStats(BLOCK_KINDS, bounds=(100, 1000))


def test_record_snapshot_and_totals() -> None:
    stats = IoStats(BLOCK_KINDS, bounds=(100, 1000))
    a, b = stats.queue("q0"), stats.queue("q1")
    a.record(READ, 4096, 50)
    a.record(READ, 4096, 100)  # on a boundary: the bucket above it (as QEMU's)
    b.record(WRITE, 512, 5000)
    b.error("IOERR")
    snap = stats.snapshot()
    assert snap["queues"]["q0"]["histogram"]["read"] == [1, 1, 0]
    assert snap["total"]["ops"]["read"] == 2 and snap["total"]["bytes"]["read"] == 8192
    assert snap["total"]["histogram"]["write"] == [0, 0, 1]
    assert snap["total"]["errors"] == {"IOERR": 1}
    assert snap["total"]["latency_ns_sum"]["read"] == 150


def test_c_counters_add_to_pythons() -> None:
    module = HELPER.load()
    stats = IoStats(BLOCK_KINDS, bounds=(100, 1000))
    q = stats.queue("sq1")
    c = q.attach_c(module.ffi)
    assert c.nbounds == 2 and list(c.bounds[0:2]) == [100, 1000]
    c.ops[READ] += 3
    c.bytes[READ] += 3 * 4096
    c.hist[READ][2] += 3
    c.lat_ns[READ] += 9000
    q.record(READ, 4096, 10)
    snap = stats.snapshot()["queues"]["sq1"]
    assert snap["ops"]["read"] == 4 and snap["bytes"]["read"] == 4 * 4096
    assert snap["histogram"]["read"] == [1, 0, 3]
    stats.set_bounds([10, 20, 30])
    assert c.nbounds == 3 and stats.snapshot()["queues"]["sq1"]["histogram"]["read"] == [0, 0, 0, 0]
    assert stats.snapshot()["queues"]["sq1"]["ops"]["read"] == 4
    stats.reset()
    assert c.ops[READ] == 0 and stats.snapshot()["total"]["ops"]["read"] == 0


@given(st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=MAX_BOUNDS, unique=True),
       st.lists(st.integers(min_value=0, max_value=10**13), max_size=50))
def test_histogram_buckets_match_bisect(bounds, latencies) -> None:
    bounds = sorted(bounds)
    stats = IoStats(BLOCK_KINDS, bounds=bounds)
    q = stats.queue("q")
    for ns in latencies:
        q.record(READ, 0, ns)
    hist = stats.snapshot()["total"]["histogram"]["read"]
    assert sum(hist) == len(latencies)
    for i in range(len(hist)):
        assert hist[i] == sum(1 for ns in latencies if bisect_right(bounds, ns) == i)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)


@given(st.sampled_from(["stats", "stats-reset", "stats-set-histogram", "status", None]),
       st.dictionaries(st.text(), json_values, max_size=4), json_values)
def test_control_commands_answer_anything(cmd, extra, bounds) -> None:
    msg = {**extra, "cmd": cmd, "boundaries_ns": bounds}
    reply = handle_control(Dev(), msg)
    if cmd not in ("stats", "stats-reset", "stats-set-histogram"):
        assert reply is None
        return
    assert reply is not None
    if reply["ok"]:
        assert "stats" in reply
    else:
        assert reply["errno"] and reply["reason"]
    try:
        check_bounds(bounds)
        valid = True
    except ValueError:
        valid = False
    if cmd == "stats-set-histogram":
        assert reply["ok"] == valid


class _Exposed:
    name = "dev"

    def __init__(self) -> None:
        self.iostats = IoStats(BLOCK_KINDS, bounds=(100, 1000))
        self.iostats.queue("q0").record(READ, 4096, 150)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda m, p: f"{m} {p} HTTP/1.1\r\n\r\n".encode(),
                                            st.sampled_from(["GET", "POST", "HEAD", "get"]),
                                            st.text(max_size=20)))
def test_metrics_endpoint_answers_any_request_and_keeps_serving(request: bytes) -> None:
    import contextlib
    import socket

    import trio

    from vfu_server.metrics import REQUEST_TIMEOUT, open_listener, serve_metrics

    async def main() -> None:
        listener = open_listener("127.0.0.1:0")
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_metrics, _Exposed(), listener)
            for data in (request, b"GET /metrics HTTP/1.1\r\n\r\n"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(data)
                    with trio.fail_after(REQUEST_TIMEOUT + 20):
                        with contextlib.suppress(OSError):
                            stream.socket.shutdown(socket.SHUT_WR)
                        reply = b""
                        while chunk := await stream.receive_some(65536):
                            reply += chunk
                assert reply.startswith(b"HTTP/1.1 "), reply[:80]
            assert b'vfu_io_ops_total{device="dev",kind="read",queue="q0"} 1.0' in reply
            nursery.cancel_scope.cancel()

    trio.run(main)
