"""The out-of-band control socket and the command-line format options of vfu-server."""

import json
import os
import subprocess
import sys
import uuid

import trio

from vfu_server.client import Client
from vfu_server.migration import driver as mg
from vfu_server.testing import running_server


async def _ask(path: str, *requests: object) -> list[dict]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        for req in requests:
            line = req if isinstance(req, bytes) else json.dumps(req).encode()
            await stream.send_all(line + b"\n")
        buf = b""
        while buf.count(b"\n") < len(requests):
            chunk = await stream.receive_some(65536)
            assert chunk, "control socket closed early"
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


async def test_control_socket_lists_selects_and_reports(tmp_path):
    ctl = str(tmp_path / "dev.ctl")
    async with running_server("example", "--control-socket", ctl, "--migration-format", "standard") as srv:
        assert os.stat(ctl).st_mode & 0o777 == 0o600
        listed, status, selected, bad, unknown = await _ask(
            ctl,
            {"cmd": "list-formats", "id": 1},
            {"cmd": "status"},
            {"cmd": "select-outgoing", "format": "opaque"},
            b"{not json",
            {"cmd": "select-outgoing", "format": "no-such-format"},
        )
        assert listed["ok"] and listed["id"] == 1
        assert {f["kind"] for f in listed["formats"]} == {"opaque", "standard"}
        assert status["status"]["selected"]["kind"] == "standard", "--migration-format applies"
        assert selected["ok"] and selected["selected"]["kind"] == "opaque"
        assert not bad["ok"] and bad["errno"] == 22
        assert not unknown["ok"] and unknown["reason"]
        # The selection made out of band is what the in-band list reports, and what a save uses.
        async with await Client.connect(srv.socket_path) as dev:
            chosen = [f for f in await mg.list_formats(dev) if f["selected"]]
            assert [f["kind"] for f in chosen] == ["opaque"]
            stream = await mg.save(dev)
            assert stream[16:32] == uuid.UUID(chosen[0]["uuid"]).bytes
    assert not os.path.exists(ctl), "the control socket is removed at shutdown"


def test_list_migration_formats_needs_no_socket():
    out = subprocess.run([sys.executable, "-m", "vfu_server", "nvme", "--list-migration-formats"],
                         capture_output=True, text=True, timeout=60, check=True)
    names = {f["name"] for f in json.loads(out.stdout)}
    assert names == {"nvme-ctrl/std/1", "opaque/vfu-nvme"}


def test_unknown_migration_format_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vfu_server", "example", "--socket-path", str(tmp_path / "s"),
                          "--migration-format", "nonsense"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "nonsense" in out.stderr
