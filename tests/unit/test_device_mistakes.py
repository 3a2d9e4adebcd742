"""A device author's mistakes are errors that say what to change, at class creation where the
class shows them, at the access where only the value does; nothing is silently ignored."""

import logging

import pytest

from vfu_server import MemoryBar, Msi, Msix, PciDevice, PciIdentity
from vfu_server.pci.endpoint import Endpoint

IDENT = PciIdentity(vendor_id=0x1234, device_id=0x0042)


@pytest.mark.parametrize(("body", "message"), [
    ("capabilites = ()", "Dev.capabilites is not a PciDevice attribute and would be ignored: "
                         "did you mean 'capabilities'?"),
    ("def rest(self): pass", "did you mean 'reset'?"),
    ("def save_sate(self): pass", "did you mean 'save_state'?"),
    ("migration_format = None", "did you mean 'migration_formats'?"),
    ("capabilities = Msix(vectors=1, table_bar=0)", "capabilities = (Msix(...),) with the comma"),
    ("capabilities = (Msix,)", "holds Msix, not a capability instance: write Msix(...)"),
    ("identity = (0x1234, 0x0042)", "identity must be a PciIdentity(vendor_id=..., device_id=...)"),
    ("intx = 1", "intx must be True or False"),
    ("rom_size = 1000", "rom_size must be 0 or a power of two of at least 0x800"),
    ("def run(self): pass", "Dev.run must be an async def"),
    ("migration_state = 'state'", "Dev.migration_state must be a tuple of attribute names: "
                                  "write migration_state = ('state',) with the comma"),
    ("migration_state = ('state',)", "Dev.migration_state names 'state': annotate it on the class "
                                     "with its dataclass, e.g. state: MyState"),
    ("@bar0.reader\n    def rd(self, offset): return 0", "Dev.rd: a BAR reader takes (self, offset, size) -> int"),
    ("@bar0.writer\n    async def wr(self, offset, size, value): pass",
     "Dev.wr: a BAR writer runs on the server's event loop and must be a plain def"),
    ("@bar0.writer\n    def wr(self, offset, size): pass", "a BAR writer takes (self, offset, size, value) -> None"),
    ("async def save_state(self): pass", "Dev.save_state must be a plain def, not async def"),
])
def test_mistakes_in_the_class_are_refused_at_class_creation(body, message):
    code = f"class Dev(PciDevice):\n    identity = IDENT\n    bar0 = MemoryBar(0x1000)\n    {body}\n"
    with pytest.raises(TypeError) as info:
        exec(code, {"PciDevice": PciDevice, "IDENT": IDENT, "MemoryBar": MemoryBar, "Msix": Msix})
    assert message in str(info.value)


def test_a_subclass_cannot_redecorate_its_parents_bar():
    class Parent(PciDevice):
        identity = IDENT
        bar0 = MemoryBar(0x1000)

        @bar0.reader
        def read_register(self, offset: int, size: int) -> int:
            return 1

    with pytest.raises(TypeError, match=r"bar0 already has a reader \(.*Parent.read_register\), so "
                                        r".*Child.read_register would replace it for every class"):
        class Child(Parent):
            @Parent.bar0.reader
            def read_register(self, offset: int, size: int) -> int:
                return 2
    assert Parent.bar0.read_fn(None, 0, 4) == 1


def test_names_of_the_device_itself_are_not_mistaken_for_misspellings():
    class Dev(PciDevice):
        identity = IDENT
        resets = 0  # a counter, not a misspelled hook
        state_size = 4

        def interrupts_raised(self) -> int:
            return 0

    Dev()


def test_a_device_without_identity_says_what_to_add():
    class Base(PciDevice):  # an abstract base may leave identity to its subclasses
        pass

    with pytest.raises(TypeError, match=r"Base declares no identity: add identity = PciIdentity"):
        Base()


class Wide(PciDevice):
    identity = IDENT
    bar0 = MemoryBar(0x1000, register_size=4)
    bar1 = MemoryBar(0x1000)

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        return {0: 0x1_0000_0000, 4: -1, 8: None}.get(offset, 7)  # type: ignore[return-value]

    @bar1.reader
    def read_any(self, offset: int, size: int) -> int:
        return 0x1FF


@pytest.mark.parametrize(("bar", "offset", "size", "shown"), [
    (0, 0, 4, "0x100000000"), (0, 4, 4, "-0x1"), (0, 8, 4, "None"), (1, 0, 1, "0x1ff"),
    (0, 2, 4, "0x100000000"),  # an unaligned read assembles registers: each one is checked
])
def test_a_reader_value_wider_than_the_access_is_an_error(bar, offset, size, shown):
    with pytest.raises(ValueError) as info:
        Endpoint(Wide()).region_read(bar, offset, size)
    text = str(info.value)
    assert f"returned {shown} for a" in text and "return an int from 0 to" in text
    assert "Wide.read_" in text


def test_a_reader_value_that_fits_is_returned():
    assert Endpoint(Wide()).region_read(0, 12, 4) == (7).to_bytes(4, "little")
    assert Endpoint(Wide()).region_read(1, 0, 2) == (0x1FF).to_bytes(2, "little")


class Plain(PciDevice):
    identity = IDENT
    bar0 = MemoryBar(0x1000)
    capabilities = (Msi(vectors=2), Msix(vectors=2, table_bar=0))


def test_interrupt_with_nothing_enabled_returns_false_and_logs_once(caplog):
    class NoIntx(Plain):
        intx = False

    dev = NoIntx()
    with caplog.at_level(logging.WARNING):
        assert dev.interrupt(0) is False
        assert dev.interrupt(1) is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("interrupt(0) dropped: the driver enabled no interrupt")
    assert "INTx: intx = False" in lines[0]


def test_intx_is_on_by_default_and_interrupt_asserts_it():
    dev = Plain()
    assert dev.interrupt(0) is True
    assert dev.irqs.intx_asserted
    assert dev.config.read(0x06, 1)[0] & 0x08, "Interrupt Status is set"


def test_intx_disabled_by_the_driver_keeps_status_and_returns_false(caplog):
    dev = Plain()
    Endpoint(dev).region_write(7, 0x04, (0x0400).to_bytes(2, "little"))  # Interrupt Disable
    with caplog.at_level(logging.WARNING):
        assert dev.interrupt(0) is False
    assert dev.config.read(0x06, 1)[0] & 0x08, "Interrupt Status is set even when disabled"
    assert "INTx disabled in the Command register" in caplog.text


def test_interrupt_vector_beyond_the_declared_ones_is_an_error():
    dev = Plain()
    assert dev.msix is not None and dev.msix.offset is not None
    Endpoint(dev).region_write(7, dev.msix.offset + 2, (0x8000).to_bytes(2, "little"))  # enable
    assert dev.interrupt(1) is False  # no eventfd from a client yet: nothing written
    with pytest.raises(ValueError, match=r"interrupt\(2\): the device declares Msix\(vectors=2\); "
                                         r"use a vector from 0 to 1"):
        dev.interrupt(2)
