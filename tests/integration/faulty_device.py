"""A device developer's own device with fault injection: the example copy engine, whose
copies a rule can fail (status register 3) or corrupt, declared through vfu_server.faults."""

from devices.example import DmaCopyEngine
from vfu_server.faults import FaultDomain, FaultSet, flip_bits

COPY = 1
COPY_FAULTS = FaultDomain(name="faulty-copy", ops={"copy": COPY}, matches=frozenset({"op"}),
                          actions=frozenset({"status", "corrupt"}), statuses={"failed": 3})


class FaultyCopyEngine(DmaCopyEngine):
    fault_domain = COPY_FAULTS
    migration_formats = None

    def __init__(self) -> None:
        super().__init__()
        self.faults = FaultSet(COPY_FAULTS)

    def copy(self) -> None:
        rule = self.faults.match(COPY) if self.faults.active else None
        if rule is None:
            return super().copy()
        s = self.state
        if rule.action == "status":
            s.status = rule.status or 0
        else:
            data = bytearray(self.dma.read(s.src_hi << 32 | s.src_lo, s.length))
            flip_bits([memoryview(data)], rule.bits, rule.rng)
            self.dma.write(s.dst_hi << 32 | s.dst_lo, bytes(data))
            s.status = 1
        s.ctrl = 0
        s.irq_count += 1
        self.interrupt(0)
