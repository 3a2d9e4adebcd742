"""Devices whose state is plain dataclasses and which have no migration code at all."""

from dataclasses import dataclass, field

from vfu_server import MemoryBar, Msix, PciDevice, PciIdentity


@dataclass
class Counter:
    value: int = 0
    history: list[int] = field(default_factory=list)


@dataclass
class TallyState:
    label: bytes = b""
    counters: tuple[int, ...] = (0, 0)
    main: Counter = field(default_factory=Counter)


class Tally(PciDevice):
    """Register 0 adds to ``main`` (and remembers it), register 4 reads how many adds."""

    cli_name = "tally"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x7A11)
    bar0 = MemoryBar(0x1000, register_size=4)
    bar1 = MemoryBar(0x1000)
    capabilities = (Msix(vectors=2, table_bar=1),)
    state: TallyState
    migration_state = ("state",)

    def __init__(self) -> None:
        super().__init__()
        self.state = TallyState(label=b"tally")

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        return self.state.main.value if offset == 0 else len(self.state.main.history)

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        self.state.main.value += value
        self.state.main.history.append(value)


@dataclass
class OtherState:
    value: int = 0
    extra: int = 0


class TallyReshaped(PciDevice):
    """The "same" device (name, identity) a build later, with a differently shaped state."""

    cli_name = "tally"
    identity = Tally.identity
    bar0 = MemoryBar(0x1000, register_size=4)
    bar1 = MemoryBar(0x1000)
    capabilities = (Msix(vectors=2, table_bar=1),)
    state: OtherState
    migration_state = ("state",)

    def __init__(self) -> None:
        super().__init__()
        self.state = OtherState()
