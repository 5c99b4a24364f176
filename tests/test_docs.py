"""The README and docs/ link only to files in the repository (a user's clone has nothing else)."""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def targets(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # code blocks hold no links
    return LINK.findall(text) + REFERENCE.findall(text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), flags=re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_relative_link_points_into_the_repository():
    checked, broken = 0, []
    for doc in documents():
        for target in targets(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (doc.parent / unquote(file_part)).resolve() if file_part else doc
            checked += 1
            if ROOT not in (resolved, *resolved.parents) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
    assert checked >= 20  # the check saw the links (the docs index alone has nine)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name


def test_no_document_mentions_files_a_clone_lacks():
    for doc in documents():
        text = doc.read_text()
        for name in ("DESIGN.md", "KERNELS.md", "VLLM.md", "../shared", "/work/"):
            assert name not in text, f"{doc.relative_to(ROOT)} mentions {name}"
