"""VERSION negotiation: what each side offers and what the session then allows."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from .constants import (
    DEFAULT_MAX_DATA_XFER,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    MAX_VERSION_REPLY,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
)
from .errors import MalformedMessage, VfioUserError
from .messages import Version

# The spec's defaults when a key is absent.
SPEC_DEFAULT_MAX_MSG_FDS = 1
SPEC_DEFAULT_MAX_DATA_XFER = 1 << 20
MAX_ACCEPTED_XFER = 64 << 20


@dataclass(frozen=True, slots=True)
class Session:
    """What both ends agreed on. ``peer_*`` is what the peer can receive."""

    major: int
    minor: int
    peer_max_msg_fds: int
    max_data_xfer_size: int
    pgsizes: int
    max_dma_maps: int
    write_multiple: bool
    peer_capabilities: dict


def _uint(caps: dict, key: str, default: int, limit: int | None = None) -> int:
    value = caps.get(key, default)
    # bool is an int subclass in Python, but not a JSON integer.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessage(f"VERSION: capability {key!r} must be a non-negative integer, got {value!r}")
    if limit is not None and value > limit:
        raise MalformedMessage(f"VERSION: capability {key!r} = {value} exceeds {limit}")
    return value


@dataclass(frozen=True, slots=True)
class ServerOffer:
    """The limits this server is willing to work with."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER
    pgsizes: int = DEFAULT_PGSIZES
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    write_multiple: bool = True

    def negotiate(self, request: Version) -> tuple[Version, Session]:
        """Answer a client's VERSION. Raises :class:`VfioUserError` for the error reply."""
        if request.major != PROTOCOL_MAJOR:
            raise VfioUserError(
                f"client speaks protocol {request.major}.{request.minor}, server {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
                errno.ENOTSUP,
            )
        caps = request.capabilities
        peer_fds = _uint(caps, "max_msg_fds", SPEC_DEFAULT_MAX_MSG_FDS)
        xfer = _uint(caps, "max_data_xfer_size", SPEC_DEFAULT_MAX_DATA_XFER)
        pgsizes = _uint(caps, "pgsizes", DEFAULT_PGSIZES)
        _uint(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS)
        wm = caps.get("write_multiple", False)
        if not isinstance(wm, bool):
            raise MalformedMessage(f"VERSION: 'write_multiple' must be a boolean, got {wm!r}")
        if caps.get("twin_socket"):
            # Not offered: server-initiated requests share the main socket.
            pass
        if pgsizes and not pgsizes & self.pgsizes:
            raise VfioUserError(f"no common page size (client {pgsizes:#x}, server {self.pgsizes:#x})", errno.ENOTSUP)
        reply_caps: dict = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": min(self.max_data_xfer_size, max(xfer, 4096)),
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        write_multiple = bool(wm and self.write_multiple)
        if write_multiple:
            reply_caps["write_multiple"] = True
        reply = Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, reply_caps)
        if 16 + len(reply.pack()) > MAX_VERSION_REPLY:
            raise AssertionError("VERSION reply would exceed QEMU's 214-byte receive buffer")
        session = Session(
            major=PROTOCOL_MAJOR,
            minor=PROTOCOL_MINOR,
            peer_max_msg_fds=peer_fds,
            max_data_xfer_size=reply_caps["max_data_xfer_size"],
            pgsizes=self.pgsizes,
            max_dma_maps=self.max_dma_maps,
            write_multiple=write_multiple,
            peer_capabilities=caps,
        )
        return reply, session


def client_offer(
    *,
    max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER,
    pgsizes: int = DEFAULT_PGSIZES,
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
    write_multiple: bool = True,
) -> Version:
    caps = {
        "max_msg_fds": max_msg_fds,
        "max_data_xfer_size": max_data_xfer_size,
        "pgsizes": pgsizes,
        "max_dma_maps": max_dma_maps,
        "write_multiple": write_multiple,
    }
    return Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, caps)


def accept_server_reply(reply: Version) -> Session:
    """Client side: check a server's VERSION reply the way QEMU 11.1 does."""
    if reply.major != PROTOCOL_MAJOR or reply.minor > PROTOCOL_MINOR:
        raise VfioUserError(f"incompatible server version {reply.major}.{reply.minor}", errno.ENOTSUP)
    caps = reply.capabilities
    fds = _uint(caps, "max_msg_fds", 8, 16)
    xfer = _uint(caps, "max_data_xfer_size", SPEC_DEFAULT_MAX_DATA_XFER, MAX_ACCEPTED_XFER)
    pgsizes = _uint(caps, "pgsizes", DEFAULT_PGSIZES)
    if pgsizes & 0xFFF or not pgsizes:
        raise VfioUserError(f"pgsizes {pgsizes:#x} too small", errno.EINVAL)
    maps = _uint(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, 65535)
    wm = caps.get("write_multiple", False)
    if not isinstance(wm, bool):
        raise MalformedMessage("server's write_multiple is not a boolean")
    return Session(reply.major, reply.minor, fds, xfer, pgsizes, maps, wm, caps)
