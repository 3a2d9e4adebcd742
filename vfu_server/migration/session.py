"""Sans-IO save and load sessions: bytes in, bytes out, no device access.

A migration stream is one or more envelopes back to back: optionally one
PRECOPY_PART envelope (sent during PRE_COPY; for standard formats it holds the
PROFILE record so the destination can refuse early), then exactly one FINAL
envelope (sent during STOP_COPY; authoritative).  Nothing may follow FINAL.

The load side never applies anything: it buffers, checks as early as it can,
and only :meth:`LoadSession.finish` -- on the RESUMING -> STOP arc -- returns
the decoded state, after the *whole* stream has been validated.  So a failed
load leaves the device exactly as the STOP -> RESUMING arc left it (reset).
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Iterable
from typing import Any

from .envelope import MAX_STREAM_BYTES, EnvelopeScanner, check_format, filter_known, parse_envelope
from .errors import MigrationError, MigrationFormatError
from .formats import PRODUCER_UUID, FormatSet, StateFormat

__all__ = ["LoadSession", "SaveSession"]


class SaveSession:
    """Produces the outgoing stream for one selected (format, minor).

    Typical v2 use::

        s = SaveSession(fmt)              # on RUNNING -> PRE_COPY or STOP -> STOP_COPY
        s.precopy(device.snapshot())      # RUNNING -> PRE_COPY (optional)
        s.read(n) ...                     # MIG_DATA_READ while in PRE_COPY
        s.stop_copy(device.save_state())  # entering STOP_COPY (device quiesced)
        s.read(n) ...                     # until it returns b""
    """

    def __init__(self, fmt: StateFormat, *, minor: int | None = None,
                 producer_uuid: uuid.UUID | None = PRODUCER_UUID) -> None:
        self.format = fmt
        self.minor = fmt._minor(minor)
        self.producer_uuid = producer_uuid
        self._buf = bytearray()
        self._pos = 0
        self._precopy_done = False
        self._final_queued = False
        self.bytes_read = 0

    def precopy(self, state: Any) -> None:
        """Queue the PRE_COPY envelope (at most once, before :meth:`stop_copy`)."""
        if self._precopy_done or self._final_queued:
            raise MigrationError(errno.EINVAL, "pre-copy data already produced")
        self._precopy_done = True
        data = self.format.encode_precopy(state, minor=self.minor,
                                          producer_uuid=self.producer_uuid)
        if data:
            self._buf += data

    def stop_copy(self, state: Any) -> None:
        """Queue the FINAL envelope from the quiesced device state."""
        if self._final_queued:
            raise MigrationError(errno.EINVAL, "stop-copy data already produced")
        self._final_queued = True
        self._precopy_done = True
        self._buf += self.format.encode(state, minor=self.minor,
                                        producer_uuid=self.producer_uuid)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet read (v1 ``pending_bytes``, PRE_COPY initial_bytes)."""
        return len(self._buf) - self._pos

    @property
    def finished(self) -> bool:
        """True once the FINAL envelope has been read completely (end of stream)."""
        return self._final_queued and self.pending_bytes == 0

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` means nothing more *for now* (PRE_COPY)
        or end of stream (after :meth:`stop_copy`)."""
        if size < 0:
            raise MigrationError(errno.EINVAL, "negative read size")
        chunk = bytes(self._buf[self._pos:self._pos + size])
        self._pos += len(chunk)
        self.bytes_read += len(chunk)
        return chunk


class LoadSession:
    """Accepts the incoming stream in arbitrary chunks and decodes it at the end.

    ``expect``: if set, only that format is accepted (strict destination).
    ``local_profile``: the destination device's own profile; standard formats
    compare it with the stream's PROFILE as soon as it arrives.
    """

    def __init__(self, formats: FormatSet | Iterable[StateFormat], *,
                 expect: StateFormat | None = None, local_profile: Any | None = None,
                 max_bytes: int = MAX_STREAM_BYTES) -> None:
        self.formats = list(formats)
        self.accept = [expect] if expect is not None else self.formats
        self.local_profile = local_profile
        self.max_bytes = max_bytes
        self.format: StateFormat | None = None
        self._buf = bytearray()
        self._scanner = EnvelopeScanner(max_bytes)
        self._final: bytes | None = None
        self._precopy_seen = False
        self._error: MigrationError | None = None
        self.bytes_written = 0

    def _fail(self, exc: MigrationError) -> MigrationError:
        # Sticky: once refused, every later write/finish reports the same reason.
        self._error = exc
        return exc

    def write(self, data: bytes) -> None:
        """MIG_DATA_WRITE.  Raises :class:`MigrationFormatError` as early as the
        problem is visible (e.g. unknown format UUID on the first 64 bytes)."""
        if self._error is not None:
            raise self._error
        if self._final is not None:
            if data:
                raise self._fail(MigrationFormatError(
                    errno.EBADMSG, "data after the FINAL envelope"))
            return
        if self.bytes_written + len(data) > self.max_bytes:
            raise self._fail(MigrationFormatError(
                errno.EFBIG, f"incoming state exceeds {self.max_bytes} bytes"))
        self._buf += data
        self.bytes_written += len(data)
        try:
            while True:
                end = self._scanner.feed(self._buf)
                if self._scanner.header is not None and self.format is None:
                    spec = check_format(self._scanner.header, self.accept)
                    self.format = next(f for f in self.accept if f.uuid == spec.uuid)
                if end is None:
                    return
                self._complete(bytes(self._buf[:end]))
                del self._buf[:end]
                self._scanner = EnvelopeScanner(self.max_bytes - self.bytes_written)
                if self._final is not None:
                    if self._buf:
                        raise MigrationFormatError(
                            errno.EBADMSG, f"{len(self._buf)} bytes after the FINAL envelope")
                    return
        except MigrationError as exc:
            raise self._fail(exc) from None

    def _complete(self, data: bytes) -> None:
        env, _ = parse_envelope(data)
        assert self.format is not None
        spec = check_format(env.header, [self.format])
        env = filter_known(env, spec)
        if env.header.precopy:
            if self._precopy_seen:
                raise MigrationFormatError(errno.EBADMSG, "more than one PRECOPY_PART envelope")
            self._precopy_seen = True
            self.format.check_precopy(env.records, self.local_profile)
        else:
            self._final = data

    @property
    def complete(self) -> bool:
        return self._final is not None

    def finish(self) -> Any:
        """Validate everything and return the decoded state (RESUMING -> STOP).

        Raises EINVAL/EBADMSG if the stream is incomplete or invalid; the caller
        must then leave the device as it was on entering RESUMING.
        """
        if self._error is not None:
            raise self._error
        if self._final is None:
            if self.bytes_written == 0:
                raise self._fail(MigrationFormatError(errno.EINVAL, "no device state received"))
            raise self._fail(MigrationFormatError(
                errno.EBADMSG, f"stream truncated: no FINAL envelope after "
                f"{self.bytes_written} bytes"))
        assert self.format is not None
        try:
            env, _ = parse_envelope(self._final)
            env = filter_known(env, check_format(env.header, [self.format]))
            state = self.format.decode_envelope(env)
            if self.local_profile is not None:
                remote = self.format.profile_of(state)
                if remote is not None and remote != self.local_profile:
                    raise MigrationFormatError(
                        errno.EINVAL, f"{self.format.name}: source profile differs from "
                        "this device's")
            return state
        except MigrationError as exc:
            raise self._fail(exc) from None
