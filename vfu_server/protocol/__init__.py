"""The sans-IO protocol core: message layouts, framing, errors, VERSION negotiation and the
connection's rules as a state machine (:mod:`.connection`). No sockets, no trio."""

from .codec import HEADER, Message, MessageDecoder, command_name, encode
from .constants import *  # noqa: F403
from .errors import (
    DmaError,
    MalformedMessage,
    NotSupported,
    ProtocolError,
    RemoteError,
    UnsupportedCommand,
    VfioUserError,
)
from .messages import *  # noqa: F403

__all__ = [
    "HEADER",
    "DmaError",
    "MalformedMessage",
    "Message",
    "MessageDecoder",
    "NotSupported",
    "ProtocolError",
    "RemoteError",
    "UnsupportedCommand",
    "VfioUserError",
    "command_name",
    "encode",
]
