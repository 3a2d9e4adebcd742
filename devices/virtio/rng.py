"""virtio-rng: the smallest complete virtio device (VIRTIO 1.2 section 5.4).

One queue; the driver offers empty buffers and the device fills them with entropy. The
transport (:mod:`vfu_devices.virtio.pci`) does everything else: PCI identity, capabilities,
feature negotiation, queue setup, validation of the guest's descriptors, interrupts.
"""

import os

from .pci import VirtioPciDevice
from .queue import DescriptorChain, SplitQueue
from .spec import DeviceId

MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioPciDevice):
    """virtio-rng: entropy for the guest's /dev/hwrng, from the host's getrandom()."""

    cli_name = "virtio-rng"
    virtio_id = DeviceId.RNG  # PCI device 0x1044
    #: opaque/vfu-virtio-rng (default) and virtio-rng/std/1: the transport is all its state
    migration_formats = "vfu_devices.virtio.migration_format:RNG_FORMATS"

    async def process(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        budget = MAX_REQUEST  # a guest cannot make us generate gigabytes per request
        for view in chain.writable:
            n = min(view.nbytes, budget)
            view[:n] = os.urandom(n)
            budget -= n
        return MAX_REQUEST - budget
