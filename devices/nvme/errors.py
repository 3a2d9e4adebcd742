"""The exception a command handler raises to complete its command with an error status."""

from __future__ import annotations

from .constants import DNR, Status


class NvmeError(Exception):
    """Complete the current command with ``status`` (a :class:`Status`), DNR set by default.

    DNR is the normal case: every error here is the guest's input being wrong, and a retry of
    the same command would fail the same way.
    """

    def __init__(self, status: Status, message: str = "", *, dnr: bool = True) -> None:
        super().__init__(message or status.name)
        self.status = status
        self.dnr = dnr

    @property
    def field(self) -> int:
        """The 15-bit status field of the completion entry (SC, SCT, DNR)."""
        return int(self.status) | (DNR if self.dnr else 0)
