"""The launcher of :mod:`vfu_server.reload`: started by a server before its sandbox (by path,
``python -I``, so it loads the standard library only), it starts a successor for each request
the server sends on the socket pair ``$VFU_RELOAD_LAUNCHER_FD`` (one JSON line: argv, env) and
answers with one JSON line: ``{"ok": true, "pid": N}`` once the successor wrote ``ready`` on its
``$VFU_RELOAD_STATUS_FD`` pipe, else ``{"ok": false, "reason": LINE}``. It ends when the server
closes its end."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

STATUS_FD_ENV = "VFU_RELOAD_STATUS_FD"
LAUNCHER_FD_ENV = "VFU_RELOAD_LAUNCHER_FD"
#: how long the launcher waits for a successor's word
SUCCESSOR_TIMEOUT = 120.0


def _launch(request: dict[str, Any]) -> dict[str, Any]:
    r, w = os.pipe()
    env = dict(request["env"])
    env[STATUS_FD_ENV] = str(w)
    try:
        proc = subprocess.Popen(request["argv"], env=env, stdin=subprocess.DEVNULL, pass_fds=(w,),
                                start_new_session=True)
    except OSError as exc:
        os.close(r)
        os.close(w)
        return {"ok": False, "reason": f"cannot start the successor: {exc}"}
    os.close(w)
    data = b""
    deadline = time.monotonic() + SUCCESSOR_TIMEOUT
    with os.fdopen(r, "rb", buffering=0) as status:
        while b"\n" not in data and time.monotonic() < deadline:
            ready, _, _ = select.select([status], [], [], 1.0)
            if ready:
                chunk = status.read(4096)
                if not chunk:
                    break
                data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    if line == "ready":
        return {"ok": True, "pid": proc.pid}
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        line = line or f"no word from it in {SUCCESSOR_TIMEOUT:.0f} s; killed"
    if line.startswith("failed: "):
        line = line[len("failed: "):]
    return {"ok": False, "reason": line or f"it exited with code {rc} without saying why"}


def launcher_main() -> int:
    sock = socket.socket(fileno=int(os.environ.pop(LAUNCHER_FD_ENV)))
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return 0  # the server ended
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        reply = _launch(json.loads(line))
        try:
            sock.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(launcher_main())
