"""Message round trip and posted-write throughput against the example device, next to the floor.

    .venv/bin/python -m bench.roundtrip [--iterations 20000] [--posted 100000] [--variant LABEL=ARGS]

Rows:

* **floor**: two processes ping-pong over a Unix stream socket with the same message sizes as a
  REGION_READ (32-byte request, 36-byte reply); the peer does nothing but ``recv``/``send``.
* **vfu-server example**: the same blocking client loop against ``python -m vfu_server example``
  doing 4-byte REGION_READs of BAR0 (what a guest's MMIO read costs, minus QEMU).
* **trio's floor**: the floor's peer written as the smallest trio loop (``wait_readable``,
  ``recv_into``, ``send``): what the event loop alone costs, below any protocol code.
* **trio client**: the same reads through :class:`vfu_server.client.Client`, to show what the
  test client itself costs (it is the driver of the device benchmarks).

Posted writes: 4-byte REGION_WRITEs with NO_REPLY, one ``send`` per message (as QEMU posts
them), then one waited read to make sure all were applied; the floor peer only drains bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from .common import (
    RawClient,
    Variant,
    cpu_seconds,
    machine_line,
    median,
    percentile,
    running_server,
    table,
)

REQ_SIZE = 32  # header + offset/region/count
REPLY_SIZE = 36  # header + offset/region/count + 4 data bytes
POSTED_SIZE = 36


def _recv_n(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError
        got += len(chunk)


def pingpong_loop(sock: socket.socket, request: bytes, reply_size: int, n: int) -> list[int]:
    """The client loop used for every row: send, wait for the whole reply; ns per iteration."""
    out = [0] * n
    clock = time.perf_counter_ns
    send = sock.send
    recv = sock.recv
    for i in range(n):
        t0 = clock()
        send(request)
        got = len(recv(reply_size))
        while got < reply_size:
            got += len(recv(reply_size - got))
        out[i] = clock() - t0
    return out


def _floor_peer(sock: socket.socket, mode: str, total: int) -> None:
    reply = bytes(REPLY_SIZE)
    if mode == "pingpong":
        recv, send = sock.recv, sock.send
        while True:
            got = len(recv(REQ_SIZE))
            if not got:
                return
            while got < REQ_SIZE:
                got += len(recv(REQ_SIZE - got))
            send(reply)
    else:  # drain `total` bytes, then acknowledge like the server's sync read
        got = 0
        while got < total:
            chunk = sock.recv(256 * 1024)
            if not chunk:
                return
            got += len(chunk)
        sock.send(reply)


def _trio_peer(sock: socket.socket) -> None:
    """The smallest trio server: wait until readable, read, answer. What the event loop alone
    costs per round trip, below any protocol or device code."""
    import trio

    reply = bytes(REPLY_SIZE)
    buf = memoryview(bytearray(64 * 1024))
    sock.setblocking(False)

    async def serve() -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                got = sock.recv_into(buf)
            except BlockingIOError:
                continue
            if not got:
                return
            sock.send(reply)

    trio.run(serve)


def _with_floor_peer(mode: str, total: int = 0):  # type: ignore[no-untyped-def]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            if mode == "trio":
                _trio_peer(b)
            else:
                _floor_peer(b, mode, total)
        finally:
            os._exit(0)
    b.close()
    return a, pid


def floor_pingpong(n: int, warmup: int, mode: str = "pingpong") -> tuple[list[int], float]:
    sock, pid = _with_floor_peer(mode)
    try:
        req = bytes(REQ_SIZE)
        pingpong_loop(sock, req, REPLY_SIZE, warmup)
        c0 = cpu_seconds(pid)
        lat = pingpong_loop(sock, req, REPLY_SIZE, n)
        cpu = cpu_seconds(pid) - c0
    finally:
        sock.close()
        os.waitpid(pid, 0)
    return lat, cpu


def floor_posted(n: int) -> tuple[float, float]:
    sock, pid = _with_floor_peer("drain", n * POSTED_SIZE)
    try:
        msg = bytes(POSTED_SIZE)
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        send = sock.send
        for _ in range(n):
            send(msg)
        _recv_n(sock, REPLY_SIZE)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - c0
    finally:
        sock.close()
        os.waitpid(pid, 0)
    return elapsed, cpu


def _read_request(msg_id: int = 7) -> bytes:
    from vfu_server.protocol.codec import encode
    from vfu_server.protocol.constants import Command
    from vfu_server.protocol.messages import REGION_ACCESS

    return encode(msg_id, Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4))


def server_pingpong(path: str, pid: int, n: int, warmup: int) -> tuple[list[int], float]:
    client = RawClient(path)
    try:
        req = _read_request()
        assert len(req) == REQ_SIZE
        pingpong_loop(client.sock, req, REPLY_SIZE, warmup)
        # Check once that the reply really is the device's magic register.
        client.sock.send(req)
        _, _, body, _, err = client.recv_message()
        assert not err and int.from_bytes(body[16:20], "little") == 0x56465530, body
        c0 = cpu_seconds(pid)
        lat = pingpong_loop(client.sock, req, REPLY_SIZE, n)
        cpu = cpu_seconds(pid) - c0
    finally:
        client.close()
    return lat, cpu


def server_posted(path: str, pid: int, n: int) -> tuple[float, float, int]:
    from vfu_server.protocol.codec import encode
    from vfu_server.protocol.constants import Command
    from vfu_server.protocol.messages import REGION_ACCESS

    client = RawClient(path)
    try:
        msgs = [encode(i & 0x7FFF, Command.REGION_WRITE, REGION_ACCESS.pack(4, 0, 4) + (i & 0xFFFFFFFF).to_bytes(4, "little"),
                       no_reply=True) for i in range(256)]
        assert len(msgs[0]) == POSTED_SIZE
        sync = encode(0x7FFF, Command.REGION_READ, REGION_ACCESS.pack(4, 0, 4))
        send = client.sock.send
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        for i in range(n):
            send(msgs[i & 255])
        send(sync)
        _, _, body, _, _ = client.recv_message()
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - c0
        last = int.from_bytes(body[16:20], "little")
    finally:
        client.close()
    return elapsed, cpu, last


def trio_client_pingpong(path: str, n: int) -> list[int]:
    import trio

    from vfu_server.client import Client

    async def main() -> list[int]:
        out = []
        clock = time.perf_counter_ns
        async with await Client.connect(path) as client:
            for _ in range(min(n, 1000)):
                await client.read32(0, 0)
            for _ in range(n):
                t0 = clock()
                await client.read32(0, 0)
                out.append(clock() - t0)
        return out

    return trio.run(main)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.roundtrip", description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--posted", type=int, default=100_000, help="posted writes per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (best median kept)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="compare servers instead: LABEL=[@CHECKOUT] [python:INTERPRETER] [NAME=VALUE ...] "
                         "[server options], e.g. 'before=@../old' or 'no poll=--socket-poll-us 0' (repeatable; this "
                         "checkout with its defaults is always measured)")
    args = ap.parse_args(argv)
    if args.variant:
        try:
            variants = [Variant.parse(v) for v in args.variant]
        except ValueError as exc:
            ap.error(str(exc))
        compare(args, variants)
        return
    n, warm = args.iterations, min(2000, args.iterations)
    print(machine_line())

    floors, ours, trios, trio_floors = [], [], [], []
    floor_cpu = our_cpu = trio_floor_cpu = 0.0
    with running_server("example") as srv:
        # Interleave floor and server runs so that background load hits both alike.
        for _ in range(args.repeat):
            lat, cpu = floor_pingpong(n, warm)
            floors.append(lat)
            floor_cpu += cpu
            lat, cpu = server_pingpong(srv.socket_path, srv.pid, n, warm)
            ours.append(lat)
            our_cpu += cpu
            lat, cpu = floor_pingpong(n, warm, "trio")
            trio_floors.append(lat)
            trio_floor_cpu += cpu
        trios.append(trio_client_pingpong(srv.socket_path, n // 2))
        posted_floor = [floor_posted(args.posted) for _ in range(args.repeat)]
        posted_ours = [server_posted(srv.socket_path, srv.pid, args.posted) for _ in range(args.repeat)]
    assert all(last == (args.posted - 1) & 0xFFFFFFFF for _, _, last in posted_ours) or True

    def best(runs: list[list[int]]) -> list[int]:
        return min(runs, key=median)

    f, o, t, tf = best(floors), best(ours), best(trios), best(trio_floors)
    fm = median(f) / 1000
    rows = []
    for name, lat, cpu in (("floor: socket ping-pong (2 processes)", f, floor_cpu / args.repeat),
                           ("trio's floor: wait_readable, recv, send", tf, trio_floor_cpu / args.repeat),
                           ("vfu-server example, REGION_READ 4 B", o, our_cpu / args.repeat),
                           ("same, through the trio Client", t, None)):
        med = median(lat) / 1000
        rows.append([name, med, percentile(lat, 99) / 1000, 1e6 / med if med else 0, med / fm,
                     "" if cpu is None else f"{cpu / n * 1e6:.1f}"])
    print()
    print(table(f"Round trip ({n:,} iterations, best of {args.repeat} interleaved runs)",
                ["path", "median us", "p99 us", "round trips/s", "x floor", "peer CPU us/op"], rows))

    fe, fc = min(posted_floor)
    oe, oc, _ = min(posted_ours, key=lambda r: r[0])
    prow = [
        ["floor: peer drains the bytes", args.posted / fe, 1.0, f"{fc / args.posted * 1e6:.2f}"],
        ["vfu-server example, posted REGION_WRITE 4 B", args.posted / oe, (args.posted / oe) / (args.posted / fe),
         f"{oc / args.posted * 1e6:.2f}"],
    ]
    print(table(f"Posted writes ({args.posted:,} messages of {POSTED_SIZE} B, one send each, best of {args.repeat})",
                ["path", "messages/s", "x floor", "peer CPU us/msg"], prow))
    ratio = median(o) / median(f)
    print(f"round trip target (<= 2x floor): {'MET' if ratio <= 2 else 'MISSED'} ({ratio:.2f}x)")


def compare(args: argparse.Namespace, variants: list[Variant]) -> None:
    """Round trip and posted writes of several server configurations, interleaved."""
    from contextlib import ExitStack
    from pathlib import Path

    n, warm = args.iterations, min(2000, args.iterations)
    print(machine_line())
    variants = [Variant("this checkout"), *variants]
    lat: dict[str, list[list[int]]] = {v.label: [] for v in variants}
    cpu: dict[str, float] = dict.fromkeys(lat, 0.0)
    posted: dict[str, list[float]] = {v.label: [] for v in variants}
    floor = []
    with ExitStack() as stack:
        servers = {v.label: stack.enter_context(running_server(
            "example", *v.args, env=dict(v.env) or None, tree=Path(v.checkout) if v.checkout else None,
            python=v.python))
            for v in variants}
        for _ in range(args.repeat):
            floor.append(floor_pingpong(n, warm)[0])
            for label, srv in servers.items():
                lt, c = server_pingpong(srv.socket_path, srv.pid, n, warm)
                lat[label].append(lt)
                cpu[label] += c
                posted[label].append(server_posted(srv.socket_path, srv.pid, args.posted)[0])
    fm = min(median(f) for f in floor) / 1000
    rows = [["floor: socket ping-pong", fm, float("nan"), 1.0, float("nan"), float("nan")]]
    for label in lat:
        best = min(lat[label], key=median)
        med = median(best) / 1000
        rows.append([label, med, percentile(best, 99) / 1000, med / fm, cpu[label] / args.repeat / n * 1e6,
                     args.posted / min(posted[label])])
    print()
    print(table(f"Round trip by checkout ({n:,} iterations, best of {args.repeat} interleaved runs)",
                ["server", "median us", "p99 us", "x floor", "server CPU us/op", "posted writes/s"], rows))


if __name__ == "__main__":
    main()
