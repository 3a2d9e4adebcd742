"""Device-state migration: VFIO v2/v1 state machines, the self-describing
DEVSTATE envelope, selectable standard/opaque formats, and sans-IO sessions.

See docs/migration-format.md for the byte-level specification.  The names a
server needs are re-exported here; device formats live with their devices
(``devices/example_format.py`` is the reference).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .controller import MigratableDevice, MigrationController
    from .envelope import Envelope, EnvelopeHeader, Record, decode_envelope, encode_envelope
    from .errors import MigrationError, MigrationFormatError
    from .formats import (
        NAMESPACE,
        FormatSet,
        OpaqueFormat,
        RecordSet,
        StandardFormat,
        StateFormat,
        format_uuid,
        get_formats,
        register_formats,
    )
    from .fsm import MigrationFeature, MigrationStateMachine, MigState, next_state, transition_path
    from .records import Field, RecordLayout, StructLayout
    from .region import MigrationRegion
    from .session import LoadSession, SaveSession

# The names are loaded when first used (PEP 562): a device server imports MigrationError with
# the device model, and the formats, sessions and state classes only if it migrates.
_WHERE = {
    "Envelope": "envelope",
    "EnvelopeHeader": "envelope",
    "Field": "records",
    "FormatSet": "formats",
    "LoadSession": "session",
    "MigState": "fsm",
    "MigratableDevice": "controller",
    "MigrationController": "controller",
    "MigrationError": "errors",
    "MigrationFeature": "fsm",
    "MigrationFormatError": "errors",
    "MigrationRegion": "region",
    "MigrationStateMachine": "fsm",
    "NAMESPACE": "formats",
    "OpaqueFormat": "formats",
    "Record": "envelope",
    "RecordLayout": "records",
    "RecordSet": "formats",
    "SaveSession": "session",
    "StandardFormat": "formats",
    "StateFormat": "formats",
    "StructLayout": "records",
    "decode_envelope": "envelope",
    "encode_envelope": "envelope",
    "format_uuid": "formats",
    "get_formats": "formats",
    "next_state": "fsm",
    "register_formats": "formats",
    "transition_path": "fsm",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "NAMESPACE",
    "Envelope",
    "EnvelopeHeader",
    "Field",
    "FormatSet",
    "LoadSession",
    "MigState",
    "MigratableDevice",
    "MigrationController",
    "MigrationError",
    "MigrationFeature",
    "MigrationFormatError",
    "MigrationRegion",
    "MigrationStateMachine",
    "OpaqueFormat",
    "Record",
    "RecordLayout",
    "RecordSet",
    "SaveSession",
    "StandardFormat",
    "StateFormat",
    "StructLayout",
    "decode_envelope",
    "encode_envelope",
    "format_uuid",
    "get_formats",
    "next_state",
    "register_formats",
    "transition_path",
]
