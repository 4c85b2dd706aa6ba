"""The repository stands alone: its documents link only to files inside it, and nothing points beside it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Not part of the repository's content: environments, caches, outputs, VCS data.
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "results", ".devcluster", ".demo-logs", "node_modules"}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ".sh", ".tpl", ""}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _content(folder: str) -> bool:
    """Whether a folder holds the repository's content (not an environment, a cache, an output; CI's own hidden
    folder is content)."""
    if folder == ".ci":
        return True
    return folder not in SKIP_DIRS and not folder.endswith(".egg-info") and not folder.startswith(".")


def _files(suffixes: set[str]) -> Iterator[Path]:
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if _content(d))
        for name in sorted(files):
            path = Path(root, name)
            if path.suffix in suffixes:
                yield path


def test_every_relative_link_in_a_document_resolves_inside_the_repository() -> None:
    bad: list[str] = []
    documents = list(_files({".md"}))
    assert REPO / "README.md" in documents
    assert REPO / "docs" / "DESIGN.md" in documents
    for doc in documents:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same page
            resolved = (doc.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                bad.append(f"{doc.relative_to(REPO)}: {target}")
    assert bad == []


def test_nothing_refers_to_a_folder_beside_the_checkout() -> None:
    beside = re.compile(r"\.\./shared\b|/work/shared\b|parents\[\d\]\.parent\s*/\s*[\"']shared")
    this_file = Path(__file__).resolve()
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _files(TEXT_SUFFIXES)
        if path.resolve() != this_file and path.stat().st_size < 2_000_000
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
        if beside.search(line)
    ]
    assert hits == []


@pytest.mark.parametrize("name", ["README.md", "docs/DESIGN.md"])
def test_top_level_documents_exist(name: str) -> None:
    assert (REPO / name).stat().st_size > 1000
