"""virtio-net served by vfu-server, driven by the guest's virtio_net driver, through a TAP
interface that lives in a network namespace of the test's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from vfu_guest import GuestKit, VfuDevice, run_guest_async

SIZE = 4 << 20
SINK = r"""
import hashlib, os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.78.0.1", 5000))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while n < int(sys.argv[2]):
    d = c.recv(65536)
    if not d:
        break
    h.update(d)
    n += len(d)
c.close()
# and back: the same amount of other data to the guest, which listens once it sent
blob = os.urandom(int(sys.argv[2]))
for _ in range(600):
    try:
        out = socket.create_connection(("10.78.0.2", 5001), timeout=1)
        break
    except OSError:
        time.sleep(0.1)
out.sendall(blob)
out.close()
open(sys.argv[1], "w").write(f"{n} {h.hexdigest()} {hashlib.sha256(blob).hexdigest()}")
"""

SCRIPT = r"""
ip link set eth0 up && ip addr add 10.78.0.2/24 dev eth0 || exit 10
n=0
until ping -c 1 -W 1 10.78.0.1 > /dev/null 2>&1; do
    n=$((n + 1)); [ "$n" -gt 90 ] && exit 11
done
echo ping=ok
echo "ping_big=$(ping -c 10 -s 1400 -i 0.2 10.78.0.1 | grep -o '[0-9]* packets received' | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
echo "data=$(sha256sum < /tmp/data | cut -d' ' -f1)"
nc 10.78.0.1 5000 < /tmp/data
echo "nc_rc=$?"
nc -l -p 5001 > /tmp/in
echo "rx=$(sha256sum < /tmp/in | cut -d' ' -f1)"
echo "features=$(cat /sys/class/net/eth0/device/features)"
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.mark.guest
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="TAP in a netns needs root and iproute2")
async def test_guest_virtio_net_tap_netns(guest_kit: GuestKit, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ns, tap = f"vfu-g{tag}", f"vfg{tag}"
    _ip("netns", "add", ns)
    sink: subprocess.Popen[bytes] | None = None
    digest_file = tmp_path / "sink.txt"

    async def plumb() -> None:
        # The device creates the TAP in our namespace when it starts; move it (its fd stays
        # attached) into the test namespace and give the host side an address.
        nonlocal sink
        with trio.fail_after(60):
            while not Path(f"/sys/class/net/{tap}").exists():
                await trio.sleep(0.05)
        _ip("link", "set", tap, "netns", ns)
        _ip("-n", ns, "addr", "add", "10.78.0.1/24", "dev", tap)
        _ip("-n", ns, "link", "set", tap, "up")
        sink = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SINK, str(digest_file), str(SIZE)],
                                stdout=subprocess.PIPE)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plumb)
            result = await run_guest_async(
                SCRIPT, [VfuDevice("virtio-net", ["--tap", tap, "--mac", "52:54:00:ab:cd:01"])],
                kit=guest_kit, timeout=300)
        facts = result.values()
        assert facts.get("ping") == "ok", result.output
        assert facts["ping_big"] == "10"
        assert facts["nc_rc"] == "0"
        assert sink is not None and sink.wait(30) == 0
        size, sent, received = digest_file.read_text().split()
        assert (int(size), sent) == (SIZE, facts["data"])
        assert facts["rx"] == received, "host -> guest data differs"
        # The TAP carries virtio-net headers: checksum offload and TSO both ways were
        # negotiated, and mergeable receive buffers (bits 0, 1, 7, 11, 15 of the sysfs string).
        features = facts["features"]
        assert all(features[b] == "1" for b in (0, 1, 7, 11, 15)), features  # 15: MRG_RXBUF
        result.assert_no_qemu_warnings()
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


PEER_IP = bytes([10, 79, 0, 1])
PEER_MAC = bytes.fromhex("020000000001")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _answer(f: bytes) -> bytes | None:
    """A two-protocol host: ARP replies for PEER_IP and ICMP echo replies."""
    if f[12:14] == b"\x08\x06" and f[38:42] == PEER_IP and f[20:22] == b"\x00\x01":
        return f[6:12] + PEER_MAC + b"\x08\x06" + f[14:20] + b"\x00\x02" + PEER_MAC + PEER_IP + f[22:32]
    if f[12:14] == b"\x08\x00" and f[23] == 1 and f[30:34] == PEER_IP and f[34] == 8:
        ihl = (f[14] & 0xF) * 4
        ip = bytearray(f[14 : 14 + ihl])
        ip[12:16], ip[16:20] = f[30:34], f[26:30]
        ip[10:12] = b"\0\0"
        ip[10:12] = _csum(bytes(ip)).to_bytes(2, "big")
        icmp = bytearray(f[14 + ihl :])
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = _csum(bytes(icmp)).to_bytes(2, "big")
        return f[6:12] + PEER_MAC + b"\x08\x00" + bytes(ip) + bytes(icmp)
    return None


PEER_SCRIPT = r"""
ip link set eth0 up && ip addr add 10.79.0.2/24 dev eth0 || exit 10
echo "pings=$(ping -c 20 -s 1000 -i 0.1 -W 2 10.79.0.1 | grep -o '[0-9]* packets received' | cut -d' ' -f1)"
"""


@pytest.mark.guest
async def test_guest_virtio_net_socket_peer(guest_kit: GuestKit, tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "peer.sock")
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await lsock.bind(path)
    lsock.listen(1)
    answered = 0

    async def peer() -> None:
        nonlocal answered
        conn, _ = await lsock.accept()
        while True:
            f = await conn.recv(65536)
            if not f:
                return
            reply = _answer(f)
            if reply is not None:
                answered += 1
                await conn.send(reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        result = await run_guest_async(PEER_SCRIPT, [VfuDevice("virtio-net", ["--peer", path])],
                                       kit=guest_kit, timeout=300)
        nursery.cancel_scope.cancel()
    lsock.close()
    assert result.values()["pings"] == "20", result.output
    assert answered >= 21  # at least one ARP plus every echo
