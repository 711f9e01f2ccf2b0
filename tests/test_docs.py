"""The documentation's relative links resolve: every linked file exists and every
``#anchor`` names a heading of the linked Markdown file (GitHub's slugs)."""
from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "infra").rglob("README.md"))]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.*)", line)
        if heading:
            s = slug(heading.group(1))
            found.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_relative_links_and_anchors_resolve():
    assert len(DOCS) > 5
    broken = {str(p.relative_to(REPO)): b for p in DOCS if (b := broken_links(p))}
    assert broken == {}


def test_the_checker_sees_a_bad_anchor_and_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top `part`\n\n## Top part\n\nSee [a](#top-part-1), [b](#nowhere), [c](gone.md).\n")
    assert anchors(page) == {"top-part", "top-part-1"}
    assert broken_links(page) == ["#nowhere: no heading with that anchor", "gone.md: no such file"]
