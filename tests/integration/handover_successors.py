"""Misbehaving successors for the handover tests, run as real processes:

    python handover_successors.py MODE DEVICE --take-over CTL [options]

MODE ``corrupt`` flips one byte of the received state stream before loading it (the load must
refuse it); ``stall`` prints ``received`` once everything arrived and then hangs before
``ready`` (the test kills it, or lets the predecessor time out); ``vanish`` closes the control
connection once everything arrived, as a crash would.
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


MODES = {"corrupt": Corrupt, "stall": Stall, "vanish": Vanish}

if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    sys.exit(cli.main(argv, successor_class=MODES[mode]))
