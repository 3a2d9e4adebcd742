"""What the guest should see of the project's devices: guest scripts plus host-side checks.

Shared by the guest tests and the demo, so the demo shows exactly what the tests assert.
"""

from __future__ import annotations

from collections.abc import Mapping

EXAMPLE_MAGIC = 0x56465530
# 1 MiB of guest RAM the kernel leaves alone (memmap=...$...), so the guest can hand physical
# addresses to the example device's DMA engine with busybox devmem alone. /dev/mem allows it
# because the range is "reserved", not "System RAM".
DMA_WINDOW = 0x10000000
EXAMPLE_APPEND = f"memmap=1M${DMA_WINDOW:#x}"

# Prints key=value facts; the host decides what is right (check_example), so a wrong answer from
# the device shows up as a readable assertion, not as a guest exit code.
EXAMPLE_SCRIPT = f"""
d=$(vfu_find_pci 0x1234 0xfe01) || exit 10
echo "bdf=${{d##*/}} vendor=$(cat $d/vendor) device=$(cat $d/device) class=$(cat $d/class)"
echo "subsystem_vendor=$(cat $d/subsystem_vendor) subsystem_device=$(cat $d/subsystem_device)"
# No driver binds 1234:fe01: turn on memory decoding, then bus mastering (COMMAND bit 2) for DMA.
echo 1 > $d/enable
cmd=$(( $(od -An -tu1 -j4 -N1 $d/config) | 6 ))
printf "\\\\$(printf %o $cmd)" | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
echo "command=0x$(od -An -tx2 -j4 -N2 $d/config | tr -d ' ')"
bar0=$(vfu_bar_addr $d 0)
echo "bar0=$bar0 bar2=$(vfu_bar_addr $d 2)"
echo "magic=$(devmem $bar0 32)"
devmem $((bar0 + 0x4)) 32 0xcafef00d
echo "scratch=$(devmem $((bar0 + 0x4)) 32)"
devmem $((bar0 + 0x4)) 32 0x12345678
echo "scratch2=$(devmem $((bar0 + 0x4)) 32)"
devmem $bar0 32 0
echo "magic_after_write=$(devmem $bar0 32)"
# DMA: copy 16 bytes inside the reserved window, device reading and writing guest RAM.
src={DMA_WINDOW:#x}; dst=$((src + 0x800))
devmem $src 32 0x11223344; devmem $((src + 4)) 32 0x55667788
devmem $((src + 8)) 32 0x99aabbcc; devmem $((src + 12)) 32 0xddeeff00
for o in 0 4 8 12; do devmem $((dst + o)) 32 0; done
devmem $((bar0 + 0x08)) 32 $src; devmem $((bar0 + 0x0c)) 32 0
devmem $((bar0 + 0x10)) 32 $dst; devmem $((bar0 + 0x14)) 32 0
devmem $((bar0 + 0x18)) 32 16
devmem $((bar0 + 0x1c)) 32 1
echo "status=$(devmem $((bar0 + 0x20)) 32) irq_count=$(devmem $((bar0 + 0x24)) 32)"
echo "dma_dst=$(devmem $dst 32),$(devmem $((dst + 4)) 32),$(devmem $((dst + 8)) 32),$(devmem $((dst + 12)) 32)"
"""

EXPECTED_EXAMPLE: dict[str, int | str] = {
    "vendor": 0x1234,
    "device": 0xFE01,
    "class": 0xFF0000,
    "subsystem_vendor": 0x1234,
    "subsystem_device": 0x0001,
    "magic": EXAMPLE_MAGIC,
    "scratch": 0xCAFEF00D,
    "scratch2": 0x12345678,
    "magic_after_write": EXAMPLE_MAGIC,
    "status": 0x1,
    "irq_count": 0x1,
    "dma_dst": "0x11223344,0x55667788,0x99aabbcc,0xddeeff00",
}


def _normalise(value: str) -> int | str:
    if "," in value:
        return ",".join(f"{int(v, 16):#010x}" for v in value.split(","))
    return int(value, 16)


def _show(value: int | str) -> str:
    return value if isinstance(value, str) else f"{value:#x}"


def check_example(facts: Mapping[str, str]) -> None:
    """Raise AssertionError listing every fact that differs from the example device contract."""
    problems: list[str] = []
    for key, want in EXPECTED_EXAMPLE.items():
        if key not in facts:
            problems.append(f"{key}: not reported by the guest")
            continue
        try:
            got = _normalise(facts[key])
        except ValueError:
            problems.append(f"{key}: unparsable {facts[key]!r}")
            continue
        if got != want:
            problems.append(f"{key}: guest saw {_show(got)}, expected {_show(want)}")
    if problems:
        raise AssertionError("example device check failed:\n  " + "\n  ".join(problems))
