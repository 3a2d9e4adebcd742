"""Misbehaving successors for the handover tests, run as real processes:

    python handover_successors.py MODE DEVICE --take-over CTL [options]

MODE ``corrupt`` flips one byte of the received state stream before loading it (the load must
refuse it); ``stall`` prints ``received`` once everything arrived and then hangs before
``ready`` (the test kills it, or lets the predecessor time out); ``vanish`` closes the control
connection once everything arrived, as a crash would; ``noack`` prints ``go`` and hangs before
it acknowledges (the predecessor must kill it). ``confined`` prints whether its sandbox is on
while it loads the stream (inside the pause), then takes over; ``late`` does the same as one
whose predecessor did not say where its sockets are (it is confined after the take-over).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vfu_server import cli
from vfu_server.handover import Successor


class Corrupt(Successor):
    def filter_stream(self, stream: bytes) -> bytes:
        damaged = bytearray(stream)
        damaged[len(damaged) // 2] ^= 0x40
        return bytes(damaged)


class Stall(Successor):
    def filter_stream(self, stream: bytes) -> bytes:
        print("received", flush=True)
        while True:  # hung, with every fd of the handover open
            time.sleep(3600)


class Vanish(Successor):
    def filter_stream(self, stream: bytes) -> bytes:
        print("received", flush=True)
        os._exit(3)  # as a crash: no abort message, the kernel closes every fd


class NoAck(Successor):
    def before_ack(self) -> None:
        print("go", flush=True)
        while True:  # hung after go: the predecessor must kill it before it serves again
            time.sleep(3600)


class Confined(Successor):
    def filter_stream(self, stream: bytes) -> bytes:
        from vfu_server import sandbox

        print("confined" if sandbox.active() is not None else "not confined", flush=True)
        return stream


class Late(Confined):
    async def prepare(self, device):  # type: ignore[no-untyped-def]
        await super().prepare(device)
        return None  # as from a predecessor that does not answer handover-info


MODES = {"corrupt": Corrupt, "stall": Stall, "vanish": Vanish, "noack": NoAck, "confined": Confined, "late": Late}

if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    sys.exit(cli.main(argv, successor_class=MODES[mode]))
