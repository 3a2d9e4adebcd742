"""The two views of a state tree that the golden-vector files and their tests compare.

Shared by the generate scripts beside this file (run as scripts: ``from jsonable import ...``)
and the unit tests (``from vectors.jsonable import ...``).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def plain(v: Any) -> Any:
    """Dataclass tree -> JSON-able values (bytes as hex strings, tuples as lists)."""
    if dataclasses.is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return v


def positional(v: Any) -> Any:
    """JSON state -> the shape of the schema-less TLV walk (structs as value lists)."""
    if isinstance(v, dict):
        return {"struct": [positional(x) for x in v.values()]}
    if isinstance(v, list):
        return [positional(x) for x in v]
    return v
