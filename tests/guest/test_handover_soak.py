"""Live handover under a running Linux guest: every server is replaced again and again while the
guest writes and reads its disks, streams TCP both ways, floods ping and reads /dev/hwrng.

QEMU 11.1 with the project's NVMe, virtio-blk, virtio-net (TAP in a network namespace) and
virtio-rng; each server is handed over ``ROUNDS`` times with ``--take-over``, alternating the
standard and opaque migration formats and changing ``--poll-us``, ``--socket-poll-us``,
``--backing-io`` and the C fast path (``VFU_FASTIO``) from one generation to the next. The
workload and the end-of-soak checks are in ``soak.py``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from soak import ServerChain, check_soak, run_soak, summary

from vfu_guest import GuestKit

ROUNDS = 20
POLL_US = ("0", "1000", "200", "50")
SOCKET_POLL_US = ("100", "0", "30")


def successor_options(name: str, i: int) -> tuple[list[str], dict[str, str]]:
    """What generation `i` of server `name` runs with: every option it may change differs
    from its predecessor's in some rounds, and the formats alternate."""
    args = ["--migration-format", "standard" if i % 2 else "opaque",
            "--socket-poll-us", SOCKET_POLL_US[i % len(SOCKET_POLL_US)], "--log-level", "info"]
    env: dict[str, str] = {}
    if name in ("nvme", "vblk"):
        args += ["--poll-us", POLL_US[i % len(POLL_US)],
                 "--backing-io", "uring" if (i // 2) % 2 else "sync"]
        # off every third generation, so that it is turned off and on again under both
        # backing modes and both formats (with uring the C path is off anyway)
        env["VFU_FASTIO"] = "0" if i % 3 == 1 else "1"
    elif name == "net":
        args += ["--poll-us", POLL_US[(i + 1) % len(POLL_US)]]
    return args, env


def hand_over_all(i: int, chains: dict[str, ServerChain]) -> None:
    for name, chain in chains.items():
        args, env = successor_options(name, i)
        chain.hand_over(args, env)


@pytest.mark.guest
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="TAP in a netns needs root and iproute2")
def test_handover_soak(guest_kit: GuestKit, tmp_path: Path) -> None:
    out = run_soak(guest_kit, tmp_path, ROUNDS, hand_over_all)
    print(summary(out))  # shown with -s: what the soak did
    check_soak(out)
    assert out.rounds_done == ROUNDS
    for name, chain in out.chains.items():
        assert len(chain.handovers) == ROUNDS, name
        formats = {h.args[h.args.index("--migration-format") + 1] for h in chain.handovers}
        assert formats == {"standard", "opaque"}, name
        # The harness's first server exited 0 once its first successor served.
        assert out.guest.servers[name].returncode == 0, (name, out.guest.servers[name].stderr[-2000:])
        for handover, (command, rc, stderr) in zip(chain.handovers, chain.logs(), strict=True):
            assert "Traceback" not in stderr and "internal error" not in stderr, f"{command}:\n{stderr}"
            # each successor but the last exited 0 when the next one took over; the last on SIGTERM
            assert rc == 0, f"{command}: rc={rc}\n{stderr[-2000:]}"
            # the format asked for is the one the state came in, and the options took effect
            took = re.search(r"took over .* \(format (\S+)\)", stderr)
            assert took is not None, f"{command}:\n{stderr[-2000:]}"
            wanted = handover.args[handover.args.index("--migration-format") + 1]
            assert took.group(1).startswith("opaque") == (wanted == "opaque"), (wanted, took.group(0))
            if "uring" in handover.args:
                assert "I/O through io_uring" in stderr or "io_uring unavailable" in stderr, stderr
    uses = {tuple(h.args) + tuple(h.env.items()) for h in out.chains["nvme"].handovers}
    assert any("uring" in u for u in uses) and any(("VFU_FASTIO", "0") in u for u in uses)
    out.guest.assert_no_qemu_warnings()
