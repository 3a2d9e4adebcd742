"""Regenerate the NVMe golden vectors: ``.venv/bin/python tests/vectors/nvme-generate.py``.

Writes nvme-standard.bin (a PRECOPY_PART envelope, then the FINAL one), nvme-opaque.bin and
nvme-expected.json (the decoded state and the record list). Only run it when a format
deliberately changes: for nvme-ctrl/std/1 that means a new minor or a new UUID. The tests
check that the encoder still produces these exact bytes and that both readers agree on them.
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from jsonable import plain  # noqa: E402 - after the sys.path set-up above

from vfu_devices.nvme.migration_format import NVME_OPAQUE, NVME_STANDARD, sample_state  # noqa: E402
from vfu_server.migration.envelope import decode_envelope  # noqa: E402


def main() -> None:
    state = sample_state()
    final = NVME_STANDARD.encode(state)
    std = NVME_STANDARD.encode_precopy(state) + final
    opq = NVME_OPAQUE.encode(state)
    (HERE / "nvme-standard.bin").write_bytes(std)
    (HERE / "nvme-opaque.bin").write_bytes(opq)
    env, _ = decode_envelope(final, [NVME_STANDARD])
    expected = {
        "comment": "Decoded values of nvme-*.bin; bytes are hex strings. "
                   "See docs/migration-format.md section 5.3.",
        "vectors": {
            "nvme-standard.bin": {"format": NVME_STANDARD.name,
                                  "format_uuid": str(NVME_STANDARD.uuid),
                                  "envelopes": ["PRECOPY_PART", "FINAL"]},
            "nvme-opaque.bin": {"format": NVME_OPAQUE.name, "format_uuid": str(NVME_OPAQUE.uuid),
                                "envelopes": ["FINAL"]},
        },
        "final_records": [{"type": f"{r.type:#06x}", "flags": r.flags, "instance": r.instance,
                           "length": len(r.payload)} for r in env.records],
        "state": plain(state),
    }
    (HERE / "nvme-expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
