"""``help(PciDevice)`` shows what a device author declares, overrides and calls; what the
server calls (region routing, reset bookkeeping, device features, migration data) lives on
:class:`vfu_server.pci.endpoint.Endpoint`."""

import pydoc

from vfu_server import PciDevice
from vfu_server.pci.endpoint import Endpoint

AUTHOR_SURFACE = {
    # declarations
    "cli_name", "identity", "capabilities", "intx", "rom_size", "migration_formats",
    "fault_domain", "faults",  # fault injection (docs/faults.md)
    # hooks
    "add_arguments", "from_args", "run", "reset", "shutdown", "client_connected",
    "client_disconnected", "describe", "rom_bytes",
    "migration_state", "quiesce", "resume", "save_state", "load_state", "reset_state",
    "migration_arc",
    "migration_profile",
    "handover_refusal", "decode_device_abi", "handover_export", "handover_adopt",
    "handover_released", "migration_imports", "sandbox_needs",
    # services
    "name", "spawn", "interrupt", "set_intx", "request_reset", "bus_master", "pci_state",
    "load_pci_state",
}
SERVER_FACING = {
    "region_read", "region_write", "region_info", "device_feature", "migration_data_read",
    "migration_data_write", "take_pending_reset", "reset_pending", "do_reset", "num_regions",
    "device_flags", "start", "attach", "close",
}


def test_pci_device_shows_the_author_surface_only():
    public = {n for n in dir(PciDevice) if not n.startswith("_")} - {"identity"}
    assert public == AUTHOR_SURFACE - {"identity"}
    text = pydoc.render_doc(PciDevice, renderer=pydoc.plaintext)
    for name in SERVER_FACING:
        assert f" {name}(" not in text and f" {name}\n" not in text, f"help(PciDevice) shows {name}"


def test_the_server_facing_methods_are_on_the_endpoint():
    assert {n for n in dir(Endpoint) if not n.startswith("_")} >= SERVER_FACING
