"""Shared helpers of the benchmarks: statistics, tables, /proc readings, device processes and a
minimal blocking vfio-user client.

The blocking client (:class:`RawClient`) exists so that a round trip measures the *server*: QEMU
is a C client, and the trio client of :mod:`vfu_server.client` would add its own Python overhead
on the other end of the socket. It speaks just enough protocol for the benchmarks.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- statistics and output ------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into docs/performance.md)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"### {title}", ""]
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def machine_line() -> str:
    load = os.getloadavg()
    return (f"host: {os.cpu_count()} CPUs, Linux {os.uname().release}, Python "
            f"{sys.version.split()[0]}, load average {load[0]:.2f} at start")


# -- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- device server processes -----------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    socket_path: str
    started_in: float  # seconds from spawn to the 'listening on' line
    stderr_path: str = ""

    def stderr_line(self, start: str) -> str:
        """The first line of the server's stderr that contains ``start`` ("" if none)."""
        try:
            text = Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""
        return next((line for line in text.splitlines() if start in line), "")

    @property
    def pid(self) -> int:
        return self.proc.pid


def server_argv(device: str, socket_path: str, *args: str, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "vfu_server", device, "--socket-path", socket_path, *args]


# Where the benchmarks' child interpreters cache bytecode. A normal installation has .pyc files;
# a checkout run with PYTHONDONTWRITEBYTECODE=1 (as in some CI sandboxes) would recompile the
# whole package at every start and make start-up look 2x slower than users see it.
PYCACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vfu-server" / "bench-pycache"


def server_env(extra: dict[str, str] | None = None, bytecode_cache: bool = True) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    if bytecode_cache and env.get("PYTHONDONTWRITEBYTECODE"):
        del env["PYTHONDONTWRITEBYTECODE"]
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass(frozen=True)
class Variant:
    """One configuration of our servers: a label for the table, server options, environment."""

    label: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: run the server from another checkout (``python -m vfu_server`` imports from its cwd)
    checkout: str | None = None
    #: run it with another interpreter (one with trio and cffi, e.g. another venv's python)
    python: str | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``LABEL=[@CHECKOUT] [python:INTERPRETER] [NAME=VALUE ...] [server options]``."""
        label, sep, rest = text.partition("=")
        if not sep or not label.strip():
            raise ValueError(f"--variant {text!r}: expected LABEL=ARGS")
        words = shlex.split(rest)
        checkout = None
        if words and words[0].startswith("@"):
            checkout = os.path.abspath(words.pop(0)[1:])
            if not os.path.isfile(os.path.join(checkout, "vfu_server", "__main__.py")):
                raise ValueError(f"--variant {text!r}: {checkout} is not a vfu-server checkout")
        python = None
        if words and words[0].startswith("python:"):
            # absolute: servers run with the checkout (or the repository) as their cwd
            python = os.path.abspath(words.pop(0)[len("python:"):])
            if not (os.path.isfile(python) and os.access(python, os.X_OK)):
                raise ValueError(f"--variant {text!r}: {python!r} is not an executable file")
        env = []
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env.append((name, value))
        return cls(label.strip(), tuple(words), tuple(env), checkout, python)


@contextmanager
def running_server(device: str, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 30.0, tree: Path | None = None,
                   python: str | None = None) -> Iterator[Server]:
    """Start ``python -m vfu_server DEVICE`` exactly as a user would; stop it on exit.

    ``tree`` runs the server from another checkout (e.g. a ``git worktree`` of an older
    commit) to measure a change against its baseline in the same run."""
    tmp = tempfile.mkdtemp(prefix="vfu-bench-")
    path = os.path.join(tmp, "dev.sock")
    err_path = os.path.join(tmp, "stderr")
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        senv = server_env(env)
        if tree is not None:
            senv["PYTHONPATH"] = str(tree)
        proc = subprocess.Popen(server_argv(device, path, *args, python=python), stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, env=senv, cwd=tree or REPO)
    try:
        assert proc.stdout is not None
        line = _readline_timeout(proc, timeout)
        started = time.perf_counter() - t0
        if not line.startswith(b"listening on"):
            raise RuntimeError(f"{device} did not start: {line!r}\n{Path(err_path).read_text()}")
        yield Server(proc, path, started, err_path)
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _readline_timeout(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    import selectors

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        line += chunk
    sel.close()
    return line


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- a blocking vfio-user client ------------------------------------------------------------


class RawClient:
    """Blocking, single-threaded: send a request, read its reply. Enough for the benchmarks."""

    def __init__(self, path: str) -> None:
        from vfu_server.protocol.codec import HEADER, encode
        from vfu_server.protocol.constants import Command
        from vfu_server.protocol.negotiation import client_offer

        self.HEADER = HEADER
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(encode(1, Command.VERSION, client_offer().pack()))
        _, _, _, _, err = self.recv_message()
        if err:
            raise RuntimeError(f"VERSION refused: errno {err}")

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def recv_message(self) -> tuple[int, int, bytes, int, int]:
        head = self.recv_exact(16)
        msg_id, cmd, size, flags, err = self.HEADER.unpack(head)
        body = self.recv_exact(size - 16) if size > 16 else b""
        return msg_id, cmd, body, flags, err

    def close(self) -> None:
        self.sock.close()


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None
