"""proxy/protocol/PROTOCOL.md agrees with the schema, and what cites it names a real section.

The code cites the protocol document as "proxy/protocol/PROTOCOL.md, section 'NAME'"; a citation
of a section that does not exist, or of a PROTOCOL.md by another path, points nowhere. Nor may
the repository cite design documents that live outside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.protocol._pb import Message_pb2
from proxy.protocol.framing import MAX_WS_MESSAGE
from proxy.protocol.messages import MAX_MESSAGE, MAX_PAYLOAD

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "proxy" / "protocol" / "PROTOCOL.md"
CITATION = re.compile(r"proxy/protocol/PROTOCOL\.md, section '([^']+)'")
#: Documents that are not in the repository, so must not be cited from it.
OUTSIDE = ("ARCHITECTURE.md", "STYLE.md", "shared/design")
_SKIP_DIRS = {"node_modules", "dist", "build", "__pycache__"}
_SUFFIXES = {".py", ".md", ".ini", ".toml", ".cfg", ".txt", ".service", ".sh"}
_THIS = Path(__file__).resolve()


def _files() -> Iterator[Path]:
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(names):
            path = Path(top, name)
            if path.suffix in _SUFFIXES and path.resolve() != _THIS:
                yield path


def _joined(text: str) -> str:
    """``text`` with line breaks (and a comment's leading ``#``) folded into single spaces."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#[ \t]*)?", " ", text)


def _sections() -> set[str]:
    return {
        match.group(1).strip()
        for match in re.finditer(r"^#+ (.+)$", DOC.read_text(encoding="utf-8"), re.MULTILINE)
    }


def _section(title: str) -> str:
    """The text of the section titled ``title``, up to the next heading of any level."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no section {title!r} in {DOC}"
    return match.group(1)


def _rows(section: str) -> list[tuple[int, str]]:
    """The (number, name) pairs a Markdown table of the section gives as ``| 1 | `name` |``."""
    return [
        (int(number), name)
        for number, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.MULTILINE)
    ]


def test_every_citation_names_a_section_that_exists() -> None:
    sections = _sections()
    cited: dict[str, list[str]] = {}
    for path in _files():
        for name in CITATION.findall(_joined(path.read_text(encoding="utf-8", errors="replace"))):
            cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    missing = {name: where for name, where in cited.items() if name not in sections}
    assert not missing, f"cited sections missing from {DOC.relative_to(ROOT)}: {missing}"
    assert cited, "nothing cites the protocol document: the scan is broken"


def test_code_cites_the_protocol_document_by_its_repository_path() -> None:
    bad = []
    for path in _files():
        if path.suffix != ".py":
            continue
        text = _joined(path.read_text(encoding="utf-8", errors="replace"))
        for match in re.finditer(r"PROTOCOL\.md", text):
            start = match.start()
            cited = text[max(0, start - 15) : start] == "proxy/protocol/"
            if not cited or not CITATION.match(text, start - 15):
                line = text[max(0, start - 40) : match.end() + 30]
                bad.append(f"{path.relative_to(ROOT)}: ...{line}...")
    assert not bad, "cite it as \"proxy/protocol/PROTOCOL.md, section 'NAME'\":\n" + "\n".join(bad)


def test_nothing_cites_documents_outside_the_repository() -> None:
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _files()
        for name in OUTSIDE
        if name in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not bad, f"citations of files that are not in the repository: {bad}"


def test_the_documented_fields_are_the_schema() -> None:
    fields = {(f.number, f.name) for f in Message_pb2.Message.DESCRIPTOR.fields}
    documented = [row for row in _rows(_section("Message")) if not row[1].isupper()]
    assert sorted(documented) == sorted(fields)


def test_the_documented_types_are_the_enum() -> None:
    values = {(v.number, v.name) for v in Message_pb2.Message.Type.DESCRIPTOR.values}
    documented = [row for row in _rows(_section("Message")) if row[1].isupper()]
    assert sorted(documented) == sorted(values)


@pytest.mark.parametrize(
    ("limit", "what"),
    [(MAX_WS_MESSAGE, "WebSocket message"), (MAX_MESSAGE, "serialised"), (MAX_PAYLOAD, "payload")],
)
def test_the_documented_size_limits_are_the_code(limit: int, what: str) -> None:
    rows = [line for line in _section("Size limits").splitlines() if line.startswith("|")]
    assert any(what in row and f"| {limit} " in row for row in rows), (limit, what, rows)
