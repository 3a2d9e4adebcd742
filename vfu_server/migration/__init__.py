"""Device-state migration: VFIO v2/v1 state machines, the self-describing
DEVSTATE envelope, selectable standard/opaque formats, and sans-IO sessions.

See docs/migration-format.md for the byte-level specification.  The names a
server needs are re-exported here; device formats live with their devices
(``example_format`` is the reference).
"""

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
