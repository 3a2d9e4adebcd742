"""Third-party devices for the handover tests, loaded as ``handover_devices:Class``."""

from devices.example import DmaCopyEngine
from vfu_server import MemoryBar


class MmapExample(DmaCopyEngine):
    """The example device with a BAR the client maps (its memfd must move with a handover)."""

    cli_name = "mmap-example"
    bar4 = MemoryBar(0x2000, mmap_areas=[(0, 0x2000)])


class BrokenExport(DmaCopyEngine):
    """A device whose handover hook has a bug: the handover fails, the server must not."""

    cli_name = "broken-export"

    def handover_export(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("bug in handover_export")
