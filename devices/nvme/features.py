"""Get/Set Features (NVMe Base 5.21, 5.27) for features whose value fits in dword 0/11.

Timestamp and Host Behavior Support carry a data buffer and are handled by the admin module.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import Feature, Status
from .errors import NvmeError
from .identify import WCTEMP
from .state import Features

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
CAP_CHANGEABLE = 1 << 2
CAP_NS_SPECIFIC = 1 << 1

SUPPORTED = frozenset(Feature)
NS_SPECIFIC = frozenset({Feature.ERROR_RECOVERY})
OVER, UNDER = 0, 1


@dataclass(frozen=True)
class FeatureLimits:
    max_queues: int
    vectors: int


def default_threshold(sensor: int, kind: int) -> int:
    if kind == UNDER:
        return 0
    return WCTEMP if sensor == 0 else 0xFFFF


def get(f: Features, fid: int, dw11: int, limits: FeatureLimits) -> int:
    """Current value (dword 0 of the completion) of feature ``fid``."""
    if fid == Feature.ARBITRATION:
        return f.arbitration
    if fid == Feature.POWER_MANAGEMENT:
        return f.power_state
    if fid == Feature.TEMPERATURE_THRESHOLD:
        sensor, kind = (dw11 >> 16) & 0xF, (dw11 >> 20) & 0x3
        if sensor > 8 or kind > UNDER:
            raise NvmeError(Status.INVALID_FIELD, "temperature threshold selector")
        value = f.temperature_thresholds.get((sensor, kind), default_threshold(sensor, kind))
        return value | sensor << 16 | kind << 20
    if fid == Feature.ERROR_RECOVERY:
        return f.error_recovery
    if fid == Feature.VOLATILE_WRITE_CACHE:
        return int(f.volatile_write_cache)
    if fid == Feature.NUMBER_OF_QUEUES:
        n = limits.max_queues - 1
        return n << 16 | n
    if fid == Feature.INTERRUPT_COALESCING:
        return f.interrupt_coalescing
    if fid == Feature.INTERRUPT_VECTOR_CONFIG:
        vector = dw11 & 0xFFFF
        if vector >= limits.vectors:
            raise NvmeError(Status.INVALID_FIELD, f"interrupt vector {vector}")
        return vector | int(f.vector_coalescing_disable.get(vector, False)) << 16
    if fid == Feature.WRITE_ATOMICITY:
        return f.write_atomicity
    if fid == Feature.ASYNC_EVENT_CONFIG:
        return f.async_event_config
    if fid == Feature.KEEP_ALIVE_TIMER:
        return f.keep_alive_timer
    raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")


def set(f: Features, fid: int, dw11: int, limits: FeatureLimits, io_queues_exist: bool) -> int:
    """Apply Set Features; returns dword 0 of the completion."""
    if fid == Feature.ARBITRATION:
        f.arbitration = dw11 & 0xFFFFFF07
    elif fid == Feature.POWER_MANAGEMENT:
        if dw11 & 0x1F != 0:  # only power state 0 exists
            raise NvmeError(Status.INVALID_FIELD, f"power state {dw11 & 0x1F}")
        f.power_state = dw11 & 0xFF
    elif fid == Feature.TEMPERATURE_THRESHOLD:
        value, sensor, kind = dw11 & 0xFFFF, (dw11 >> 16) & 0xF, (dw11 >> 20) & 0x3
        if kind > UNDER or (sensor > 8 and sensor != 0xF):
            raise NvmeError(Status.INVALID_FIELD, "temperature threshold selector")
        for s in range(9) if sensor == 0xF else (sensor,):
            f.temperature_thresholds[(s, kind)] = value
    elif fid == Feature.ERROR_RECOVERY:
        if dw11 & 1 << 16:  # DULBE needs deallocated-block error support we don't offer
            raise NvmeError(Status.INVALID_FIELD, "DULBE not supported")
        f.error_recovery = dw11 & 0xFFFF
    elif fid == Feature.VOLATILE_WRITE_CACHE:
        f.volatile_write_cache = bool(dw11 & 1)
    elif fid == Feature.NUMBER_OF_QUEUES:
        nsq, ncq = dw11 & 0xFFFF, dw11 >> 16
        if nsq == 0xFFFF or ncq == 0xFFFF:
            raise NvmeError(Status.INVALID_FIELD, "number of queues 65536")
        if io_queues_exist:
            raise NvmeError(Status.COMMAND_SEQUENCE_ERROR, "number of queues after queue creation")
        n = limits.max_queues - 1
        f.queues_granted = (min(nsq, n), min(ncq, n))
        # Report what the controller supports, like real controllers and the Linux driver expect.
        return n << 16 | n
    elif fid == Feature.INTERRUPT_COALESCING:
        f.interrupt_coalescing = dw11 & 0xFFFF
    elif fid == Feature.INTERRUPT_VECTOR_CONFIG:
        vector = dw11 & 0xFFFF
        if vector >= limits.vectors:
            raise NvmeError(Status.INVALID_FIELD, f"interrupt vector {vector}")
        f.vector_coalescing_disable[vector] = bool(dw11 & 1 << 16)
    elif fid == Feature.WRITE_ATOMICITY:
        f.write_atomicity = dw11 & 1
    elif fid == Feature.ASYNC_EVENT_CONFIG:
        f.async_event_config = dw11
    elif fid == Feature.KEEP_ALIVE_TIMER:
        f.keep_alive_timer = dw11
    else:
        raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    return 0


def capabilities(fid: int) -> int:
    if fid not in SUPPORTED:
        raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    return CAP_CHANGEABLE | (CAP_NS_SPECIFIC if fid in NS_SPECIFIC else 0)
