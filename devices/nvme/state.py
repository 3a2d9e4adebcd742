"""All device state of the NVMe controller as plain dataclasses.

Everything the guest can observe or that must survive a migration lives here, in one
:class:`NvmeState` tree of ints, bools, bytes, lists and dicts: no trio objects, no backends,
no views. Runtime machinery (tasks, events, in-flight counts) lives beside it in the controller
and is rebuilt from this state.

The records of the migration formats that are plain copies of a part of this tree are these
classes themselves (migration_format.py imports them under the format's names); their
``opaque_name`` is the name ``opaque/vfu-nvme``'s schema has always given them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .constants import NVME_VERSION_1_4


@dataclass
class Registers:
    """The writable/observable BAR0 registers (CAP is derived from the configuration)."""

    vs: int = NVME_VERSION_1_4
    intms: int = 0
    cc: int = 0
    csts: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0


@dataclass
class SubmissionQueueState:
    opaque_name: ClassVar[str] = "SqState"

    qid: int
    base: int
    size: int  # entries (1-based)
    cqid: int
    priority: int = 0
    head: int = 0
    tail: int = 0


@dataclass
class CompletionQueueState:
    opaque_name: ClassVar[str] = "CqState"

    qid: int
    base: int
    size: int
    vector: int
    irq_enabled: bool = True
    head: int = 0
    tail: int = 0
    phase: int = 1


@dataclass
class ShadowDoorbells:
    """Doorbell Buffer Config: shadow doorbell and EventIdx pages (0: not configured)."""

    opaque_name: ClassVar[str] = "Dbbuf"

    doorbells: int = 0
    event_idx: int = 0

    @property
    def enabled(self) -> bool:
        return self.doorbells != 0


@dataclass
class Features:
    arbitration: int = 0
    power_state: int = 0
    #: (sensor, threshold type) -> threshold in Kelvin; sensor 0 is the composite temperature
    temperature_thresholds: dict[tuple[int, int], int] = field(default_factory=dict)
    error_recovery: int = 0
    volatile_write_cache: bool = True
    #: 0-based numbers of I/O queues granted by Set Features Number of Queues (None: not set)
    queues_granted: tuple[int, int] | None = None
    interrupt_coalescing: int = 0
    #: vector -> coalescing disable bit
    vector_coalescing_disable: dict[int, bool] = field(default_factory=dict)
    write_atomicity: int = 0
    async_event_config: int = 0
    keep_alive_timer: int = 0
    host_behavior: bytes = bytes(512)
    #: host-set timestamp in ms and the controller's monotonic ms when it was set
    timestamp_ms: int = 0
    timestamp_set_at_ms: int = 0
    timestamp_set: bool = False


@dataclass
class AsyncEvent:
    opaque_name: ClassVar[str] = "AerEvent"

    event_type: int
    info: int
    log_page: int

    @property
    def dw0(self) -> int:
        return self.event_type | self.info << 8 | self.log_page << 16


@dataclass
class AsyncEventState:
    #: CIDs of outstanding Asynchronous Event Request commands (admin queue), oldest first
    outstanding: list[int] = field(default_factory=list)
    pending: list[AsyncEvent] = field(default_factory=list)
    #: event types reported and not yet cleared by reading their log page
    masked_types: set[int] = field(default_factory=set)
    changed_namespaces: list[int] = field(default_factory=list)


@dataclass
class SmartCounters:
    opaque_name: ClassVar[str] = "SmartState"

    bytes_read: int = 0
    bytes_written: int = 0
    host_read_commands: int = 0
    host_write_commands: int = 0
    busy_time_minutes: int = 0
    power_cycles: int = 1
    power_on_seconds: int = 0
    unsafe_shutdowns: int = 0
    media_errors: int = 0
    error_count: int = 0


@dataclass
class ErrorLogEntry:
    opaque_name: ClassVar[str] = "ErrorEntry"

    error_count: int
    sqid: int
    cid: int
    status: int
    lba: int = 0
    nsid: int = 0


@dataclass
class NamespaceState:
    nsid: int
    #: index of the active LBA format (0: 512-byte blocks, 1: 4096-byte blocks)
    lba_format: int


@dataclass
class NvmeState:
    regs: Registers = field(default_factory=Registers)
    sqs: dict[int, SubmissionQueueState] = field(default_factory=dict)
    cqs: dict[int, CompletionQueueState] = field(default_factory=dict)
    shadow: ShadowDoorbells = field(default_factory=ShadowDoorbells)
    features: Features = field(default_factory=Features)
    aer: AsyncEventState = field(default_factory=AsyncEventState)
    smart: SmartCounters = field(default_factory=SmartCounters)
    namespaces: list[NamespaceState] = field(default_factory=list)
    error_log: list[ErrorLogEntry] = field(default_factory=list)
