"""Every code block of the README and the device guide is a file the test suite runs: each
fenced block names its file (``<!-- file: PATH -->``, the whole file, or ``<!-- excerpt: PATH
-->``, a verbatim part of it), the block must match it, and the file must be one the tests run
(a test module, a device the tests serve, or a docs example a test names)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/device-guide.md"]
BLOCK = re.compile(r"(?:<!-- (file|excerpt): (\S+) -->\n)?```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks():
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(doc, *match.groups(), id=f"{doc}:{line}")


def _tests_text() -> str:
    return "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))


@pytest.mark.parametrize(("doc", "kind", "path", "lang", "body"), list(_blocks()))
def test_code_block_is_a_file_the_tests_run(doc, kind, path, lang, body):
    assert kind, f"{doc}: a ```{lang} block without <!-- file: PATH --> or <!-- excerpt: PATH -->"
    source = (REPO / path).read_text()
    if kind == "file":
        assert body == source, f"{doc} shows {path}, but not as it is: copy the file again"
    else:
        assert body in source, f"{doc} quotes {path}, but the file no longer has these lines"
    if path.startswith("tests/"):
        assert Path(path).name.startswith("test_"), f"{path} is not a test module"
    elif path.startswith("docs/examples/"):
        assert Path(path).name in _tests_text(), f"no test uses {path}"
    else:
        assert path.startswith("devices/"), f"{path}: the tests serve the built-in devices only"


def test_every_doc_has_checked_blocks():
    for doc in DOCS:
        assert any(p.values[0] == doc for p in _blocks()), doc
