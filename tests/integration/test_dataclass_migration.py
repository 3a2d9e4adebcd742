"""A device whose state is plain dataclasses migrates (opaque) with no migration code: it names
its state attributes in ``migration_state`` and the base class does the rest."""

import errno
import json
import subprocess
import sys

import pytest

from vfu_server.client import Client
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import migration_pair, running_server

TALLY = "tests.integration.dataclass_devices:Tally"
RESHAPED = "tests.integration.dataclass_devices:TallyReshaped"


def test_the_device_lists_its_automatic_opaque_format():
    out = subprocess.run([sys.executable, "-m", "vfu_server", TALLY, "--list-migration-formats"],
                         capture_output=True, text=True, timeout=60, check=True)
    (fmt,) = json.loads(out.stdout)
    assert fmt["name"] == "opaque/auto/tally" and fmt["kind"] == "opaque" and fmt["default"]


async def test_dataclass_state_migrates_with_no_migration_code():
    async with migration_pair(TALLY, ram_size=1 << 20) as (src, dst, _ram):
        for value in (5, 7, 30):
            await src.write32(0, 0, value)
        irq = (await src.enable_msix(2))[1]
        stats = await mg.migrate(src, dst, fmt="opaque")
        assert stats.total_bytes > 0
        assert await mg.get_state(dst) == MigState.RUNNING
        assert await dst.read32(0, 0) == 42
        assert await dst.read32(0, 4) == 3, "the list inside the nested dataclass came along"
        # The PCI part came too: MSI-X stays enabled on the destination.
        msix = await dst.find_capability(0x11)
        assert await dst.config_read(msix + 2, 2) & 0x8000
        await dst.write32(0, 0, 1)
        assert await dst.read32(0, 0) == 43, "the destination's state is its own, not the stream's"
        assert irq.count() == 0


async def test_a_source_with_other_dataclasses_is_refused():
    async with (
        running_server(TALLY) as a, running_server(RESHAPED, "--log-level", "info") as b,
        await Client.connect(a.socket_path) as src, await Client.connect(b.socket_path) as dst,
    ):
        await src.write32(0, 0, 9)
        stream = await mg.save(src)
        with pytest.raises(RemoteError) as info:
            await mg.load(dst, stream)
        assert info.value.errno == errno.EINVAL
        assert "opaque/auto/tally: schema v1/" in b.stderr() and "does not match this build's" in b.stderr()
        assert await src.read32(0, 0) == 9, "the source runs on"
