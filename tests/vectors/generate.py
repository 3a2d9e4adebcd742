"""Regenerate the golden vectors: ``.venv/bin/python tests/vectors/generate.py``.

Only run this when the format deliberately changes (which, for a published
standard format, means a new minor or a new UUID); the tests check that the
encoder still produces these exact bytes.
"""

from __future__ import annotations

import json
import pathlib

from jsonable import plain

from vfu_devices.example_format import EXAMPLE_OPAQUE, EXAMPLE_STANDARD, sample_state

HERE = pathlib.Path(__file__).parent


def main() -> None:
    state = sample_state()
    std = EXAMPLE_STANDARD.encode_precopy(state) + EXAMPLE_STANDARD.encode(state)
    opq = EXAMPLE_OPAQUE.encode(state)
    (HERE / "example-standard.bin").write_bytes(std)
    (HERE / "example-opaque.bin").write_bytes(opq)
    expected = {
        "comment": "Decoded values of example-*.bin; bytes are hex strings. "
                   "See docs/migration-format.md.",
        "vectors": {
            "example-standard.bin": {"format": EXAMPLE_STANDARD.name,
                                     "format_uuid": str(EXAMPLE_STANDARD.uuid),
                                     "envelopes": ["PRECOPY_PART", "FINAL"]},
            "example-opaque.bin": {"format": EXAMPLE_OPAQUE.name,
                                   "format_uuid": str(EXAMPLE_OPAQUE.uuid),
                                   "envelopes": ["FINAL"]},
        },
        "state": plain(state),
    }
    (HERE / "example-expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
