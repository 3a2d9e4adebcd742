"""A device developer's own device with fault injection: the example copy engine, whose
copies a rule can fail (status register 3) or corrupt, declared through vfu_server.faults."""

from vfu_devices.example import DmaCopyEngine
from vfu_server.faults import FaultDomain, FaultSet, flip_bits

COPY = 1
COPY_FAULTS = FaultDomain(name="faulty-copy", ops={"copy": COPY}, matches=frozenset({"op"}),
                          actions=frozenset({"status", "corrupt"}), statuses={"failed": 3})


class FaultyCopyEngine(DmaCopyEngine):
    fault_domain = COPY_FAULTS
    # Not migratable: --control-socket is offered for the faults alone.
    migration_formats = None
    migration_state = ()

    def __init__(self) -> None:
        super().__init__()
        self.faults = FaultSet(COPY_FAULTS)

    def copy(self) -> None:
        rule = self.faults.match(COPY) if self.faults.active else None
        if rule is None:
            return super().copy()
        r = self.regs
        if rule.action == "status":
            r.status = rule.status or 0
        else:
            data = bytearray(self.dma.read(r.src, r.len))
            flip_bits([memoryview(data)], rule.bits, rule.rng)
            self.dma.write(r.dst, bytes(data))
            r.status = 1
        r.ctrl = 0
        r.irq_count += 1
        self.interrupt(0)
