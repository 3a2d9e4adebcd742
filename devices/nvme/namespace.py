"""A namespace: a block backend seen as an array of logical blocks of the active LBA format."""

from __future__ import annotations

from dataclasses import dataclass

from vfu_server.block import BlockBackend

from .constants import Status
from .errors import NvmeError
from .identify import LBA_FORMATS
from .state import NamespaceState


@dataclass(eq=False)
class Namespace:
    state: NamespaceState
    backend: BlockBackend

    @property
    def nsid(self) -> int:
        return self.state.nsid

    @property
    def lba_shift(self) -> int:
        return LBA_FORMATS[self.state.lba_format]

    @property
    def block_size(self) -> int:
        return 1 << self.lba_shift

    @property
    def nsze(self) -> int:
        """Size in logical blocks; a partial block at the end of the backend is not exposed."""
        return self.backend.size >> self.lba_shift

    def check_range(self, slba: int, nlb: int) -> tuple[int, int]:
        """Byte offset and length of ``nlb`` blocks at ``slba``, or LBA Out of Range."""
        shift = LBA_FORMATS[self.state.lba_format]  # on every I/O: no property chain
        if slba + nlb > self.backend.size >> shift:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} beyond {self.nsze} blocks")
        return slba << shift, nlb << shift


def lba_format_for(block_size: int) -> int:
    shift = block_size.bit_length() - 1
    if 1 << shift != block_size or shift not in LBA_FORMATS:
        raise ValueError(f"unsupported LBA size {block_size} (use 512 or 4096)")
    return LBA_FORMATS.index(shift)
