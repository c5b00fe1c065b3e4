"""The documentation holds together: links resolve, cited pages exist, the README stays short."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOC_PAGES]

# [text](target) or [text](target "title"); images too. Code spans and fenced blocks are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# a page name cited in code: docs/cache.md, testing.md, data/README.md
CITED = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def test_docs_pages_exist():
    names = {p.name for p in DOC_PAGES}
    for page in ("cache.md", "genres.md", "captions.md", "search.md", "app-and-report.md",
                 "benchmarks.md", "development.md", "testing.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    links = [t for t in _links(page) if not _is_external(t)]
    bad = []
    for target in links:
        if "#" in target:
            bad.append(f"{target}: link to a page, not to a heading (headings move between pages)")
            continue
        if not (page.parent / target).resolve().exists():
            bad.append(f"{target}: no such file")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_link_checker_sees_links():
    """The checker finds the links it must check (an empty match would pass vacuously)."""
    assert "docs/genres.md" in _links(README)
    assert "testing.md" in _links(ROOT / "docs" / "development.md")


def _cited_pages(text: str) -> set[str]:
    return set(CITED.findall(text))


def test_citation_pattern():
    text = 'see docs/search.md) and (docs_captions.md, "testing.md". file.mdx x.md5'
    assert _cited_pages(text) == {"docs/search.md", "docs_captions.md", "testing.md"}


def _resolves(cited: str) -> bool:
    return any((base / cited).exists() for base in (ROOT, ROOT / "docs"))


def test_pages_cited_in_code_exist():
    missing = []
    files = [*(ROOT / "clipposter").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    assert files
    for path in files:
        for cited in _cited_pages(path.read_text(encoding="utf-8")):
            if not _resolves(cited):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "; ".join(sorted(missing))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details to docs/"


def _documented_imports() -> list[tuple[str, str, str]]:
    """(page, module, name) for every `from clipposter… import …` line in the README and docs/."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for m in re.finditer(r"^\s*from (clipposter[\w.]*) import \(?([^)\n]+(?:\n[^)\n]+)*?)\)?$", text, re.M):
            for name in re.split(r"[,\s]+", m.group(2).strip()):
                if name and name != "\\":
                    found.append((page.name, m.group(1), name.split(" as ")[0]))
    return found


def test_documented_imports_exist():
    """The Python examples in the docs import names that exist where they say (a page that drifts from
    the code fails here)."""
    import importlib

    imports = _documented_imports()
    assert len(imports) >= 10  # the examples are seen
    missing = [f"{page}: from {module} import {name}" for page, module, name in imports
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, missing
