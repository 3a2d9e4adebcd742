"""Helpers for property tests against live device servers.

Each hypothesis example of an async test runs in its own trio loop, so servers that should
survive many examples are started here without trio (:func:`server_processes`), and every
example reconnects to them. :func:`mutate_stream` turns a valid byte stream (a migration stream,
a message) into a damaged one: the destination must refuse it cleanly or load it, and never die.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def server_processes(device: str, *args: str, count: int = 2) -> Iterator[list[str]]:
    """``count`` servers of ``device`` (``vfu-server DEVICE *args``); yields their socket paths.

    On exit every server gets SIGTERM and must exit 0: a server that a fuzzer hurt fails here.
    """
    base = tempfile.mkdtemp(prefix="vfu-fuzz-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    procs: list[subprocess.Popen[bytes]] = []
    paths: list[str] = []
    try:
        for i in range(count):
            path = os.path.join(base, f"dev{i}.sock")
            proc = subprocess.Popen([sys.executable, "-m", "vfu_server", device, *args, "--socket-path", path],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith(b"listening on"):
                proc.kill()
                raise RuntimeError(f"{device} did not start: {proc.stderr.read() if proc.stderr else line!r}")
            paths.append(path)
        yield paths
        for proc in procs:
            proc.terminate()
            rc = proc.wait(timeout=15)
            assert rc == 0, f"a {device} server exited with {rc} after the fuzzing"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def mutate_stream(data: st.DataObject, stream: bytes, max_mutations: int = 4) -> bytes:
    """Flip bytes, cut the tail or insert junk, 1..``max_mutations`` times."""
    base = bytearray(stream)
    for _ in range(data.draw(st.integers(1, max_mutations))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(base) - 1)))
        if kind == "flip" and base:
            base[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del base[pos:]
        else:
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(base)
