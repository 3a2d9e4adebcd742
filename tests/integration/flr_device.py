"""The example device with Function Level Reset, for the server's reset-after-a-write path."""

from __future__ import annotations

from vfu_devices.example import DmaCopyEngine
from vfu_server import Msix, PciExpress, PowerManagement


class FlrEngine(DmaCopyEngine):
    cli_name = "flr-example"
    capabilities = (PowerManagement(), Msix(vectors=4, table_bar=2, pba_offset=0x800), PciExpress(flr=True))
