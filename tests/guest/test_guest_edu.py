"""The device guide's edu device (docs/examples/edu.py) under QEMU 11.1, driven by Linux:
the guest finds it on the PCI bus and uses its registers and its DMA engine through devmem."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfu_guest import GuestKit, VfuDevice, run_guest
from vfu_guest.checks import DMA_WINDOW, EXAMPLE_APPEND

EDU = f"{Path(__file__).parents[2] / 'docs' / 'examples' / 'edu.py'}:Edu"

# No driver binds 1234:11e8: the script enables memory decoding and bus mastering itself, and
# hands the device physical addresses in a window of RAM the kernel leaves alone.
SCRIPT = f"""
d=$(vfu_find_pci 0x1234 0x11e8) || exit 10
echo "class=$(cat $d/class) irq_pin=$(od -An -tu1 -j61 -N1 $d/config | tr -d ' ')"
echo 1 > $d/enable
cmd=$(( $(od -An -tu1 -j4 -N1 $d/config) | 6 ))
printf "\\\\$(printf %o $cmd)" | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
bar0=$(vfu_bar_addr $d 0)
echo "ident=$(devmem $bar0 32)"
devmem $((bar0 + 0x04)) 32 0x0000ffff
echo "liveness=$(devmem $((bar0 + 0x04)) 32)"
devmem $((bar0 + 0x08)) 32 12
echo "factorial=$(devmem $((bar0 + 0x08)) 32)"
devmem $((bar0 + 0x60)) 32 0x5
echo "irq_raised=$(devmem $((bar0 + 0x24)) 32)"
devmem $((bar0 + 0x64)) 32 0x5
echo "irq_acked=$(devmem $((bar0 + 0x24)) 32)"
src={DMA_WINDOW:#x}; dst=$((src + 0x800))
devmem $src 32 0xfeedf00d; devmem $((src + 4)) 32 0x0badcafe; devmem $dst 32 0; devmem $((dst + 4)) 32 0
devmem $((bar0 + 0x80)) 32 $src; devmem $((bar0 + 0x88)) 32 0x40000
devmem $((bar0 + 0x90)) 32 8; devmem $((bar0 + 0x98)) 32 1
devmem $((bar0 + 0x80)) 32 0x40000; devmem $((bar0 + 0x88)) 32 $dst
devmem $((bar0 + 0x90)) 32 8; devmem $((bar0 + 0x98)) 32 3
echo "dma_cmd=$(devmem $((bar0 + 0x98)) 32) dma=$(devmem $dst 32),$(devmem $((dst + 4)) 32)"
"""


@pytest.mark.guest
def test_edu_in_a_linux_guest(guest_kit: GuestKit) -> None:
    device = VfuDevice(EDU, args=("--dma-mask", "0xffffffff"))
    result = run_guest(SCRIPT, [device], kit=guest_kit, append=EXAMPLE_APPEND)
    facts = result.values()
    assert facts["class"] == "0x00ff00"
    assert facts["irq_pin"] == "1", "INTx pin A"
    assert int(facts["ident"], 16) == 0x010000ED
    assert int(facts["liveness"], 16) == 0xFFFF0000
    assert int(facts["factorial"], 16) == 479001600
    assert int(facts["irq_raised"], 16) == 5 and int(facts["irq_acked"], 16) == 0
    assert int(facts["dma_cmd"], 16) == 2, "start bit cleared when done"
    assert facts["dma"].lower() == "0xfeedf00d,0x0badcafe"
    result.assert_no_qemu_warnings()
