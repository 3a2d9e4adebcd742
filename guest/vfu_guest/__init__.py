"""QEMU 11.1 and a tiny Linux guest for the project's tests and demo.

`provision()` fetches QEMU and builds the guest once (cached); `run_guest()` boots it with the
project's devices (each a separate ``python -m vfu_server`` process) and QEMU's own devices
attached, runs a shell script inside and returns what happened.
"""

from .aptenv import ProvisionError
from .provision import GuestKit, cache_dir, current_kit, provision
from .runner import (
    GuestError,
    GuestResult,
    QemuDevice,
    ServerLog,
    VfuDevice,
    builtin_nvme,
    builtin_virtio_blk,
    builtin_virtio_net,
    run_guest,
    run_guest_async,
)

__all__ = [
    "GuestError",
    "GuestKit",
    "GuestResult",
    "ProvisionError",
    "QemuDevice",
    "ServerLog",
    "VfuDevice",
    "builtin_nvme",
    "builtin_virtio_blk",
    "builtin_virtio_net",
    "cache_dir",
    "current_kit",
    "provision",
    "run_guest",
    "run_guest_async",
]
