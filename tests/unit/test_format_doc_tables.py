"""docs/migration-format.md read literally, against the encoder.

Every ``layout NAME, N bytes`` block of the document is parsed (offset, size and name of each
field) and compared with the layout the code encodes with; every layout the standard formats
encode must have such a block. The record-order tables of sections 5.2-5.4 are compared with
the order the formats write and enforce, and the NVMe version the document, the README and the
controller state is checked to be one and the same.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from devices.nvme import migration_format as nvme
from devices.nvme.constants import NVME_VERSION_1_4
from devices.virtio import migration_format as virtio
from vfu_server.migration import controller, envelope, formats, generic
from vfu_server.migration.example_format import EXAMPLE_REGS, EXAMPLE_STANDARD
from vfu_server.migration.records import StructLayout

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "migration-format.md").read_text()
README = (ROOT / "README.md").read_text()

#: The document's name for each layout -> what the code encodes it with.
ENCODERS: dict[str, StructLayout | struct.Struct] = {
    "ENVELOPE_HEADER": envelope._HDR,
    "RECORD_HEADER": envelope._REC,
    "END": envelope._END,
    "PROFILE": generic.PROFILE,
    "PCI_CONFIG": generic.PCI_CONFIG,
    "MSIX": generic.MSIX,
    "MSIX.entry": generic.MSIX_ENTRY,
    "INTX": generic.INTX,
    "EXAMPLE_REGS": EXAMPLE_REGS,
    "CTRL_PROFILE": nvme._ABI_FIXED,
    "CTRL_PROFILE.namespace": nvme._ABI_NS,
    "CTRL_REGS": nvme.CTRL_REGS,
    "SQ_STATE": nvme.SQ_ENTRY,
    "CQ_STATE": nvme.CQ_ENTRY,
    "ADMIN_QUEUES": nvme.ADMIN_QUEUES,
    "NVMECS_V0": nvme.NVMECS_V0,
    "DBBUF": nvme.DBBUF,
    "FEATURE": nvme.FEATURE,
    "FEATURE.04": nvme.TEMP_ENTRY,
    "FEATURE.09": nvme.VECTOR_ENTRY,
    "AER": nvme.AER,
    "AER.event": nvme.AER_EVENT,
    "ERROR_LOG": nvme.ERROR_LOG,
    "ERROR_LOG.entry": nvme.ERROR_ENTRY,
    "SMART": nvme.SMART,
    "NAMESPACE": nvme.NAMESPACE,
    "PENDING_CQE": nvme.PENDING_CQE,
    "PENDING_CQE.entry": nvme.CQE,
    "VIRTIO_PROFILE": virtio.VIRTIO_PROFILE,
    "VIRTIO_PART_HEADER": virtio._PART_HDR,
    "VQ_CFG": virtio._VQ_CFG,
    "VQ_NOTIFY_CFG": virtio._VQ_NOTIFY,
    "VQ_RUNTIME": virtio.VQ_RUNTIME,
    "ISR_GEN": virtio.ISR_GEN,
    "NET_EXTRA": virtio.NET_EXTRA,
    "BLK_CONFIG": virtio.BLK_CONFIG,
    "BLK_INFLIGHT": virtio.BLK_INFLIGHT,
    "BLK_ID": virtio.BLK_ID,
    "OPAQUE_BLOB": formats._OPAQUE_HDR,
    "MIG_FORMATS.entry": controller._FMT_ENTRY,
    "MIG_FORMAT_SELECT": controller._SELECT,
    "MIG_LAST_ERROR": controller._LAST_ERROR,
}
STANDARD = [EXAMPLE_STANDARD, nvme.NVME_STANDARD, virtio.BLK_STANDARD, virtio.NET_STANDARD,
            virtio.RNG_STANDARD]

_LAYOUT = re.compile(r"^layout (\S+)(?: \(([^)]*)\))?, (\d+) bytes$")
_FIELD = re.compile(r"^\s*(\d+)\s+(\d+)\s+([a-z_][a-z0-9_]*)(?:\s|$)")


def doc_layouts() -> dict[str, tuple[int, list[tuple[int, int, str]]]]:
    """``{name: (stated size, [(offset, size, field)])}`` from the document's layout blocks."""
    out: dict[str, tuple[int, list[tuple[int, int, str]]]] = {}
    fenced = False
    current: list[tuple[int, int, str]] | None = None
    for line in DOC.splitlines():
        if line.startswith("```"):
            fenced, current = not fenced, None
            continue
        if not fenced:
            continue
        m = _LAYOUT.match(line)
        if m:
            assert m[1] not in out, f"two layout blocks named {m[1]}"
            current = []
            out[m[1]] = (int(m[3]), current)
        elif current is not None and (f := _FIELD.match(line)):
            current.append((int(f[1]), int(f[2]), f[3]))
    return out


def code_fields(enc: StructLayout | struct.Struct) -> list[tuple[int, int, str | None]]:
    """``(offset, size, name)`` of each field the encoder writes (names only where it has them)."""
    out: list[tuple[int, int, str | None]] = []
    off = 0
    if isinstance(enc, StructLayout):
        for f in enc.fields:
            out.append((off, f.size, f.name))
            off += f.size
        return out
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", enc.format.lstrip("<")):
        n = int(count or 1)
        if code in "sx":
            out.append((off, n, None))
            off += n
            continue
        for _ in range(n):
            size = struct.calcsize("<" + code)
            out.append((off, size, None))
            off += size
    return out


DOC_LAYOUTS = doc_layouts()


def test_every_table_is_checked_and_every_layout_documented() -> None:
    assert set(DOC_LAYOUTS) == set(ENCODERS), (
        f"documented but unchecked: {sorted(set(DOC_LAYOUTS) - set(ENCODERS))}; "
        f"checked but undocumented: {sorted(set(ENCODERS) - set(DOC_LAYOUTS))}")
    mapped = {id(e) for e in ENCODERS.values()}
    for fmt in STANDARD:
        for layout in fmt.layouts.values():
            if layout.fields:  # VIRTIO_PARTS carries a VIRTIO_PART_HEADER and a value instead
                assert id(layout) in mapped, f"{fmt.name}: {layout.name} has no layout table"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_layout_table_matches_the_encoder(name: str) -> None:
    stated, fields = DOC_LAYOUTS[name]
    enc = ENCODERS[name]
    code = code_fields(enc)
    assert stated == enc.size, f"{name}: the document says {stated} bytes, the encoder writes {enc.size}"
    # A literal reader takes each field where the table puts it: no gaps, no overlaps.
    end = 0
    for off, size, field in fields:
        assert off == end, f"{name}.{field}: at {off}, the previous field ends at {end}"
        end = off + size
    assert end == stated, f"{name}: fields end at {end}, the table says {stated} bytes"
    assert [(o, s) for o, s, _ in fields] == [(o, s) for o, s, _ in code], name
    if isinstance(enc, StructLayout):
        assert [f for _, _, f in fields] == [f for _, _, f in code], name


def test_layout_blocks_parse_lines_the_way_they_read() -> None:
    """The parser itself: a field line counts, a continuation line does not."""
    stated, fields = DOC_LAYOUTS["NAMESPACE"]
    assert stated == 96 and fields[-2:] == [(48, 16, "uuid"), (64, 32, "backend_hash")]
    assert ("flbas" in [f for _, _, f in fields]) and not any(f == "format" for _, _, f in fields)


def _order_rows() -> dict[str, list[tuple[int, str]]]:
    """The "Order | Type" tables of sections 5.2, 5.3 and 5.4: (record type, the row's text)."""
    out: dict[str, list[tuple[int, str]]] = {}
    section = None
    for line in DOC.splitlines():
        if line.startswith("### 5."):
            section = line.split()[1]
        m = re.match(r"^\| (\d+) \| (0x[0-9A-Fa-f]{4}) \|", line)
        if m and section:
            out.setdefault(section, []).append((int(m[2], 16), line))
    return out


def _order_tables() -> dict[str, list[int]]:
    return {sec: [t for t, _ in rows] for sec, rows in _order_rows().items()}


def test_order_tables_name_the_flags_the_writer_sets() -> None:
    """A row says OPTIONAL or PER_INSTANCE exactly when the record is written with that flag."""
    layouts = {t: lay for fmt in STANDARD for t, lay in fmt.layouts.items()}
    for rows in _order_rows().values():
        for t, row in rows:
            assert ("OPTIONAL" in row) == layouts[t].optional, row
            assert ("PER_INSTANCE" in row) == layouts[t].per_instance, row


def test_order_tables_are_the_order_formats_write_and_enforce() -> None:
    tables = _order_tables()
    assert set(tables) == {"5.2", "5.3", "5.4"}
    for fmt, section in ((EXAMPLE_STANDARD, "5.2"), (nvme.NVME_STANDARD, "5.3"),
                         (virtio.BLK_STANDARD, "5.4"), (virtio.NET_STANDARD, "5.4"),
                         (virtio.RNG_STANDARD, "5.4")):
        mine = sorted(fmt.rank, key=fmt.rank.__getitem__)
        assert [t for t in tables[section] if t in fmt.rank] == mine, fmt.name
        assert set(mine) <= set(tables[section]), fmt.name


def test_one_nvme_version_everywhere() -> None:
    """The controller's VS, the README and the format text agree: NVMe 1.4."""
    assert NVME_VERSION_1_4 == 0x00010400
    assert "an NVMe 1.4 controller (VS 1.4.0)" in README
    assert "NVMe 2." not in README.split("## Running a device")[1].split("## Writing a device")[0]
    assert "reports VS = 0x00010400 (1.4.0)" in " ".join(DOC.split())
    assert nvme.sample_state().profile.device_abi[4 + 8 : 4 + 12] == struct.pack("<I", NVME_VERSION_1_4)
