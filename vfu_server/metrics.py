"""``--metrics ADDR:PORT``: a device's I/O statistics (:mod:`vfu_server.iostats`) in the
Prometheus exposition format, at ``http://ADDR:PORT/metrics``.

The exposition text comes from prometheus_client; the HTTP side is a few lines of trio in the
server's own event loop rather than prometheus_client's server thread, so a scrape reads the
counters between two requests of the device, never in the middle of one, and a server never
has a second thread touching device state.

Metrics (labels ``device``, ``queue`` and ``kind`` or ``status``):

* ``vfu_io_ops_total``, ``vfu_io_bytes_total``: completed requests and the bytes they moved;
* ``vfu_io_errors_total``: requests that failed, by the status the device returned;
* ``vfu_io_in_flight``: requests being worked on;
* ``vfu_io_latency_seconds``: histogram with the operator's boundaries (``stats-set-histogram``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import trio

log = logging.getLogger("vfu_server.metrics")

#: Longest request head a scraper may send, and how long it may take to send it.
MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 16


class MetricsAddressError(ValueError):
    """``--metrics`` cannot be used; one line saying why."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface); port 0 picks a free one
    (logged at info level)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise MetricsAddressError(f"--metrics {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9510")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def open_listener(text: str) -> socket.socket:
    """Bind the exporter's socket now, so that a busy port is a start-up error."""
    host, port = parse_address(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MetricsAddressError(f"--metrics {text}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise MetricsAddressError(f"--metrics {text}: cannot listen: {exc.strerror}") from None
    sock.set_inheritable(False)
    bound = sock.getsockname()
    log.info("metrics on http://%s:%d/metrics", *bound[:2])
    return sock


class StatsCollector:
    """A prometheus_client collector reading one device's :class:`IoStats` at scrape time."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        name = self.device.name
        snap = self.device.iostats.snapshot()
        ops = CounterMetricFamily("vfu_io_ops", "Requests completed", labels=["device", "queue", "kind"])
        nbytes = CounterMetricFamily("vfu_io_bytes", "Bytes moved by completed requests",
                                     labels=["device", "queue", "kind"])
        errors = CounterMetricFamily("vfu_io_errors", "Requests that failed, by device status",
                                     labels=["device", "queue", "status"])
        inflight = GaugeMetricFamily("vfu_io_in_flight", "Requests being worked on", labels=["device", "queue"])
        latency = HistogramMetricFamily("vfu_io_latency_seconds", "Server-side request latency",
                                        labels=["device", "queue", "kind"])
        bounds = snap.get("histogram_boundaries_ns")
        for queue, q in snap["queues"].items():
            for kind in snap["kinds"]:
                ops.add_metric([name, queue, kind], q["ops"][kind])
                nbytes.add_metric([name, queue, kind], q["bytes"][kind])
                if bounds is not None:
                    cumulative, buckets = 0, []
                    for le, n in zip([*(f"{b / 1e9:.9g}" for b in bounds), "+Inf"], q["histogram"][kind], strict=True):
                        cumulative += n
                        buckets.append((le, cumulative))
                    latency.add_metric([name, queue, kind], buckets, q["latency_ns_sum"][kind] / 1e9)
            for status, n in q["errors"].items():
                errors.add_metric([name, queue, status], n)
            inflight.add_metric([name, queue], q["in_flight"])
        yield from (ops, nbytes, errors, inflight)
        if bounds is not None:
            yield latency


def exposition(device: Any) -> tuple[bytes, str]:
    """The body of a scrape and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(device))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _response(code: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def serve_metrics(device: Any, listener: socket.socket) -> None:
    """Answer scrapes until cancelled; a bad request gets a 4xx, never the server's end."""
    sock = trio.socket.from_stdlib_socket(listener)

    async def one(conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            head = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_REQUEST:
                    try:
                        chunk = await stream.receive_some(4096)
                    except (trio.BrokenResourceError, OSError):
                        return
                    if not chunk:
                        break
                    head += chunk
            parts = head.split(b"\r\n", 1)[0].split()
            if len(head) > MAX_REQUEST:
                reply = _response(431, "Request Header Fields Too Large", b"request head too long\n")
            elif len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                reply = _response(400, "Bad Request", b"not an HTTP request\n")
            elif parts[0] != b"GET":
                reply = _response(405, "Method Not Allowed", b"GET /metrics\n")
            elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                reply = _response(404, "Not Found", b"GET /metrics\n")
            else:
                try:
                    body, ctype = exposition(device)
                except Exception:
                    log.exception("metrics: exposition failed")
                    reply = _response(500, "Internal Server Error", b"exposition failed\n")
                else:
                    reply = _response(200, "OK", body, ctype)
            try:
                await stream.send_all(reply)
            except (trio.BrokenResourceError, OSError):
                pass

    # Scrapers are few; a flood of connections waits in the backlog instead of taking fds.
    limit = trio.Semaphore(MAX_CONNECTIONS)

    async def limited(conn: trio.socket.SocketType) -> None:
        try:
            await one(conn)
        finally:
            limit.release()

    async with trio.open_nursery() as nursery:
        with sock:
            while True:
                await limit.acquire()
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:  # out of fds, a connection reset before accept, ...
                    limit.release()
                    log.warning("metrics: accept: %s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(limited, conn)
