"""Block backends: the storage that NVMe and virtio-blk devices read and write.

``async with open_backend("disk.raw", size="1G") as backend:`` gives a :class:`BlockBackend`
backed by a raw file, an NBD export through libnbd (``nbd://host:port/export``,
``nbd+unix:///export?socket=/path``, ``nbds://...`` with TLS) or, with no backing, RAM.
"""

from .base import BlockBackend
from .errors import (
    BackendSpecError,
    BlockError,
    BlockIOError,
    BlockRangeError,
    BlockReadOnlyError,
)
from .file import FileBackend
from .memory import MemoryBackend
from .nbd import NbdBackend, NbdTarget, parse_nbd_uri
from .spec import (
    BACKING_IO,
    BackendSpec,
    open_backend,
    open_file_backend,
    parse_backend_spec,
    parse_size,
)

__all__ = [
    "BACKING_IO",
    "BackendSpec",
    "BackendSpecError",
    "BlockBackend",
    "BlockError",
    "BlockIOError",
    "BlockRangeError",
    "BlockReadOnlyError",
    "FileBackend",
    "MemoryBackend",
    "NbdBackend",
    "NbdTarget",
    "open_backend",
    "open_file_backend",
    "parse_backend_spec",
    "parse_nbd_uri",
    "parse_size",
]
