"""The project's NVMe and virtio-blk devices with their file backend swapped for
:class:`~vfu_server.block.uring.UringFileBackend`, for ``bench.devices --io uring``.

Loaded by the server as ``bench._uring_devices:NvmeUring`` (the ``module:Class`` form). Until
the backend spec grows an ``--backing-io`` option this is how the benchmark selects the I/O
path without touching the device code: both devices look ``FileBackend`` up in their module
namespace when they open a file.
"""

from devices.nvme import controller as _nvme
from devices.virtio import blk as _blk
from vfu_server.block.uring import UringFileBackend

_nvme.FileBackend = UringFileBackend  # type: ignore[misc,assignment]
_blk.FileBackend = UringFileBackend  # type: ignore[misc,assignment]

NvmeUring = _nvme.NvmeController
VirtioBlkUring = _blk.VirtioBlk
