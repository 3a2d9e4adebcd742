"""Deliberately wrong devices: the guest checks must catch them, or they prove nothing.

Loaded by the server process as ``python -m vfu_server tests.guest.broken_devices:CLASS``
(with the repository root as working directory).
"""

from __future__ import annotations

from vfu_devices.example import DmaCopyEngine


class WrongMagic(DmaCopyEngine):
    """The example device, except that MAGIC reads one off."""

    magic = 0x56465531


class CrashesOnStart(DmaCopyEngine):
    """Dies before it listens, like a server with a bad configuration."""

    def __init__(self) -> None:
        raise RuntimeError("CrashesOnStart: refusing to start")
