"""The repository is self-contained: no references to design notes outside it, and every
`docs/design.md §N[.M]` citation names a section that exists in docs/design.md."""

import re
import subprocess
import unicodedata

import pytest
from conftest import ROOT

DESIGN = ROOT / "docs" / "design.md"
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini"}
SKIP_DIRS = {".git", ".venv", "runs", "mlruns", "mlartifacts", "outputs", "logs", "shared", "__pycache__"}
THIS = "tests/test_docs_links.py"

# Built from pieces so that this file's own source does not spell them out.
FORBIDDEN = {
    "a DESIGN" + ".md file (the design notes are docs/design.md)": re.compile(r"DESIGN\.md"),
    "a research" + "/ notes path (their facts are in docs/design.md)": re.compile(
        r"(?<![\w/.:-])research/|research/[\w.-]+\.md"
    ),
    "a shared" + "/ folder outside the repository": re.compile(r"(?<![\w-])shared/"),
}
CITATION = re.compile(r"docs/design\.md((?:\s*(?:,|and|or|&)?\s*§\s*\d+(?:\.\d+)*)+)")
SECTION_REF = re.compile(r"§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^(#{2,4})\s+(\d+(?:\.\d+)*)\.?\s+(.+?)\s*$")
LINK = re.compile(r"\]\(([^)\s]*?design\.md)#([^)\s]+)\)")
README_LINK = re.compile(r"\]\((?:\.\./)?README\.md#([^)\s]+)\)")


def _repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore (new files count before they are committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    keep = []
    for p in sorted(set(paths)):
        parts = p.split("/")
        if parts[0] in SKIP_DIRS or any(part in {".venv", ".git", "__pycache__"} for part in parts):
            continue
        if p == THIS or not (ROOT / p).is_file():
            continue
        if any(p.endswith(s) for s in SUFFIXES) or parts[-1] == "Makefile":
            keep.append(p)
    return keep


def _slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces → hyphens."""
    out = []
    for ch in title.strip().lower():
        if ch in " -":
            out.append("-")
        elif ch == "_" or unicodedata.category(ch)[0] in "LN":
            out.append(ch)
    return "".join(out)


def _headings(text: str) -> list[tuple[int, str, str]]:
    """(level, number, title) of the numbered headings, code blocks skipped."""
    found, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else HEADING.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2), m.group(3)))
    return found


def _anchors(text: str) -> set[str]:
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"^#{1,6}\s+(.+?)\s*$", line)
        if m:
            anchors.add(_slug(m.group(1)))
    return anchors


def _sections() -> set[str]:
    return {number for _, number, _ in _headings(DESIGN.read_text(encoding="utf-8"))}


FILES = _repo_files()


def test_files_found():
    assert "docs/design.md" in FILES and "README.md" in FILES and "src/models/moe.py" in FILES


def test_no_reference_outside_the_repository():
    bad = []
    for path in FILES:
        for lineno, line in enumerate((ROOT / path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    bad.append(f"{path}:{lineno}: {what}: {line.strip()[:120]}")
    assert not bad, "references to files that are not in the repository:\n" + "\n".join(bad)


def test_design_headings_are_numbered_consistently():
    headings = _headings(DESIGN.read_text(encoding="utf-8"))
    numbers = [number for _, number, _ in headings]
    assert len(numbers) >= 10
    assert len(numbers) == len(set(numbers)), "duplicate section numbers in docs/design.md"
    chapters = set()
    for level, number, title in headings:
        depth = number.count(".") + 1
        assert level == depth + 1, f"§{number} {title}: '##' for N, '###' for N.M, '####' for N.M.K"
        if depth > 1:
            assert number.rsplit(".", 1)[0] in chapters, f"§{number} sits outside its chapter"
        chapters.add(number)


def test_every_design_citation_names_an_existing_section():
    sections = _sections()
    bad = []
    for path in FILES:
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        refs = [(m.start(), ref) for m in CITATION.finditer(text) for ref in SECTION_REF.findall(m.group(1))]
        if path == "docs/design.md":  # its own bare "§N.M" cross-references
            refs += [(m.start(), m.group(1)) for m in SECTION_REF.finditer(text)]
        for pos, ref in refs:
            if ref not in sections:
                lineno = text.count("\n", 0, pos) + 1
                bad.append(f"{path}:{lineno}: docs/design.md §{ref} does not exist")
    assert not bad, "\n".join(bad)


def test_design_anchor_links_resolve():
    design_anchors = _anchors(DESIGN.read_text(encoding="utf-8"))
    readme_anchors = _anchors((ROOT / "README.md").read_text(encoding="utf-8"))
    bad = []
    for path in FILES:
        if not path.endswith(".md"):
            continue
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        for m in LINK.finditer(text):
            if m.group(2) not in design_anchors:
                bad.append(f"{path}: link to {m.group(1)}#{m.group(2)}: no such heading")
        if path == "docs/design.md":
            for m in README_LINK.finditer(text):
                if m.group(1) not in readme_anchors:
                    bad.append(f"{path}: link to README.md#{m.group(1)}: no such heading")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "line, ok",
    [
        ("see docs/design.md §2.9", True),
        ("docs/design.md §7.1 and §7.2", True),
        ("docs/design.md §99", False),
        ("docs/design.md §2.99", False),
    ],
)
def test_citation_parser(line, ok):
    sections = _sections()
    refs = [ref for m in CITATION.finditer(line) for ref in SECTION_REF.findall(m.group(1))]
    assert refs and all(r in sections for r in refs) == ok


@pytest.mark.parametrize(
    "line, flagged",
    [
        ("see " + "DESIGN" + ".md §2", True),
        ("notes in ../" + "research/" + "dsmoe-recipe.md", True),
        ("research" + "/moe-performance.md §3.5", True),
        ("/work/" + "shared" + "/DESIGN", True),
        ("(shared and routed experts)", False),
        ("https://example.org/research/", False),
        ("docs/design.md §2.3", False),
    ],
)
def test_forbidden_patterns(line, flagged):
    assert any(p.search(line) for p in FORBIDDEN.values()) == flagged
