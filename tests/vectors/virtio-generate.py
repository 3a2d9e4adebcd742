"""Regenerate the virtio golden vectors: ``.venv/bin/python tests/vectors/virtio-generate.py``.

Writes, for blk, net and rng: virtio-KIND-standard.bin (a PRECOPY_PART envelope, then the
FINAL one) and virtio-KIND-opaque.bin, plus virtio-expected.json (per vector: format, UUID,
envelopes, the FINAL envelope's record list, and the decoded state). Only run it when a
format deliberately changes: for virtio-*/std/1 that means a new minor or a new UUID. The tests
(tests/unit/test_virtio_migration_vectors.py) check that the encoder still produces these
exact bytes and that both readers agree on them.
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from jsonable import plain  # noqa: E402 - after the sys.path set-up above

from vfu_devices.virtio import migration_format as vm  # noqa: E402
from vfu_server.migration.envelope import decode_envelope  # noqa: E402

FORMATS = {"blk": (vm.BLK_STANDARD, vm.BLK_OPAQUE), "net": (vm.NET_STANDARD, vm.NET_OPAQUE),
           "rng": (vm.RNG_STANDARD, vm.RNG_OPAQUE)}


def main() -> None:
    vectors = {}
    states = {}
    for kind, (std, opq) in FORMATS.items():
        state = vm.sample_state(kind)
        final = std.encode(state)
        env, _ = decode_envelope(final, [std])
        records = [{"type": f"{r.type:#06x}", "flags": r.flags, "instance": r.instance,
                    "length": len(r.payload)} for r in env.records]
        (HERE / f"virtio-{kind}-standard.bin").write_bytes(std.encode_precopy(state) + final)
        (HERE / f"virtio-{kind}-opaque.bin").write_bytes(opq.encode(state))
        vectors[f"virtio-{kind}-standard.bin"] = {
            "kind": kind, "format": std.name, "format_uuid": str(std.uuid),
            "envelopes": ["PRECOPY_PART", "FINAL"], "final_records": records}
        vectors[f"virtio-{kind}-opaque.bin"] = {
            "kind": kind, "format": opq.name, "format_uuid": str(opq.uuid), "envelopes": ["FINAL"]}
        states[kind] = plain(state)
    expected = {
        "comment": "Decoded values of virtio-*.bin; bytes are hex strings. "
                   "See docs/migration-format.md section 5.4.",
        "vectors": vectors,
        "states": states,
    }
    (HERE / "virtio-expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
