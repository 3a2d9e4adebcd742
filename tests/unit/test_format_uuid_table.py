"""The UUID table of docs/migration-format.md must match what the devices really offer: another
implementation reads the document, not our code."""

import re
from pathlib import Path

from vfu_server import registry
from vfu_server.pci.migration import migration_formats_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "migration-format.md"


def test_every_device_format_is_in_the_spec_with_its_uuid():
    table = dict(re.findall(r"^\| ([a-z0-9/.-]+) \| (?:standard|opaque) \| ([0-9a-f-]{36}) \|$", DOC.read_text(), re.M))
    seen = 0
    for name in ("example", "nvme", "virtio-blk", "virtio-net", "virtio-rng"):
        formats = migration_formats_of(registry.load(name))
        assert formats is not None, f"{name} must be migratable"
        kinds = {f.kind for f in formats}
        assert kinds == {"standard", "opaque"}, f"{name} offers {kinds}"
        for fmt in formats:
            assert table.get(fmt.name) == str(fmt.uuid), f"{fmt.name} {fmt.uuid} missing or wrong in the spec"
            seen += 1
    assert seen == 10
