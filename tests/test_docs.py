"""The docs hold together: every `docs/<name>.md#<anchor>` that bot.py, the README, the docs, .env.example or the tests
mention leads to that place, every relative link in README.md and docs/*.md points at a file (and a heading or anchor)
that exists, and the anchors bot.py's log lines point at stay where they are."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from tests.conftest import ROOT

MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MENTIONING = [ROOT / "bot.py", ROOT / ".env.example", *MARKDOWN, *sorted((ROOT / "tests").glob("*.py"))]
REFERENCE = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
# What log lines and messages point at: each an explicit <a id="..."></a>, so that rewording a heading moves nothing.
STABLE = {
    "skills.md": ["cpu-bound-work", "slow-backends"],
    "troubleshooting.md": ["never-connected"],
    "configuration.md": ["settings"],
}


def prose(path: Path) -> list[str]:
    """The lines of a markdown file outside its code blocks."""
    lines, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: links and inline HTML reduced to their text, lower case, punctuation
    dropped (letters of any script, digits, - and _ kept), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", re.sub(r"<[^>]*>", "", heading)).strip().lower()
    return "".join(char for char in text if char.isalnum() or char in "-_ ").replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The explicit id="..." anchors of a markdown file, and its headings' anchors (a repeated one gets -1, -2...)."""
    found, seen = set(), {}
    for line in prose(path):
        found.update(re.findall(r'\bid="([^"]+)"', line))
        if heading := re.match(r"#{1,6} (.+)", line):
            anchor = slug(heading[1])
            found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
            seen[anchor] = seen.get(anchor, 0) + 1
    return frozenset(found)


def test_every_docs_reference_leads_to_its_place():
    references = 0
    for path in MENTIONING:
        for name, anchor in REFERENCE.findall(path.read_text(encoding="utf-8")):
            references += 1
            doc = ROOT / "docs" / name
            where = f"{path.relative_to(ROOT)} mentions docs/{name}#{anchor}"
            assert doc.is_file(), f"{where}, but there is no docs/{name}"
            assert anchor in anchors(doc), f"{where}, but docs/{name} has no such heading or id"
    assert references  # the check reads what it should


def test_every_relative_link_in_the_readme_and_the_docs_leads_somewhere():
    links = 0
    for path in MARKDOWN:
        for line in prose(path):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https://, mailto: ...
                    continue
                links += 1
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                where = f"{path.relative_to(ROOT)} links to {target}"
                assert linked.exists(), f"{where}, which does not exist"
                if anchor and linked.suffix == ".md":
                    assert anchor in anchors(linked), f"{where}, but {linked.name} has no such heading or id"
    assert links


def test_the_anchors_log_lines_point_at_are_explicit():
    for name, ids in STABLE.items():
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        for anchor in ids:
            assert f'<a id="{anchor}"></a>' in text, f"docs/{name} lost its anchor {anchor}"


def test_the_readme_fits_a_newcomer():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 350  # the rest lives in docs/
