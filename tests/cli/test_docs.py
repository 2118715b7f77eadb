"""The README and docs/ as a reader follows them: every relative link and image resolves, every `#anchor`
names a heading, the README stays the short door to docs/ (with CI's `make test`), and every command its
command table names is a real `bench` command. No training: the whole file takes seconds."""

import re
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handler binds sys.stderr at import: not a test's capsys
import pytest

from bench.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target), with an optional "title"; the text may span lines but holds no brackets.
LINK = re.compile(r"!?\[[^\[\]]*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked (a link's text may hold one)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            kept.append("")
        else:
            kept.append("" if fenced else line)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)) if "\n" not in m.group(0) else m.group(0), "\n".join(kept))


def links_in(text: str) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(text))]


def links(page: Path) -> list[str]:
    return links_in(page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code marks dropped), lower case, punctuation
    removed but hyphens and underscores kept, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of the page's headings, with GitHub's -1, -2, ... for repeated ones."""
    found, seen = set(), {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it names, its anchor) for every relative link and image of the page."""
    out = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        out.append((target, (page.parent / path).resolve() if path else page, anchor))
    return out


def test_the_docs_exist_and_link_back_to_the_readme():
    assert len(PAGES) > 5, PAGES
    for page in PAGES[1:]:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{page.name}: the first line is its title"
        assert "../README.md" in links(page), f"{page.name} does not link back to the README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_image_resolves(page):
    found = relative_links(page)
    missing = [target for target, path, _ in found if not path.exists()]
    assert not missing, f"{page.relative_to(REPO)}: links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_anchor_within_a_page_names_one_of_its_headings(page):
    own = anchors(page)
    broken = [target for target, path, anchor in relative_links(page) if anchor and path == page and anchor not in own]
    assert not broken, f"{page.relative_to(REPO)}: no heading for {broken}; its anchors: {sorted(own)}"


def test_anchors_into_other_pages_name_their_headings():
    """`docs/training.md#algorithms` and the like: the file part is checked above, the anchor here."""
    broken = []
    for page in PAGES:
        for target, path, anchor in relative_links(page):
            if anchor and path != page and path.suffix == ".md" and path.exists() and anchor not in anchors(path):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_link_checker_sees_links_images_and_anchors():
    """Guards the checks above against passing because they found nothing."""
    assert slug("Speed: `bench perf`") == "speed-bench-perf"
    assert slug("The gold world (2026-12-01): `results/smol-gold.md`") == "the-gold-world-2026-12-01-resultssmol-goldmd"
    readme = links(README)
    assert "docs/training.md#algorithms" in readme and "docs/results.md" in readme
    results_page = links(REPO / "docs" / "results.md")
    assert any(target.startswith("../results/") and target.endswith(".png") for target in results_page)
    assert links_in("see [a](x.md), ![b](y.png \"t\") and `[c](not-a-link)`\n```\n[d](code)\n```") == ["x.md", "y.png"]


def test_the_readme_is_short_and_keeps_ci_s_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has {len(text.splitlines())} lines"
    bash_blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert any("make test" in (line.strip() for line in block.splitlines()) for block in bash_blocks), \
        "README.md has no ```bash block with the line `make test` (.ci/run and CI run it)"


def readme_commands() -> list[str]:
    """The commands of the README's command table: the first cell of each row under `## Commands`."""
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `bench ")]
    return [re.match(r"\| `bench ([\w-]+)", row).group(1) for row in rows]


def test_the_readme_command_table_lists_every_command():
    assert sorted(readme_commands()) == sorted(COMMANDS), \
        "the README's command table and bench/cli/__init__.py's COMMANDS differ"


@pytest.mark.parametrize("command", readme_commands())
def test_each_command_in_the_readme_table_is_real(command, workdir, capsys):
    assert command in COMMANDS, f"bench {command} is not in bench/cli/__init__.py's COMMANDS"
    try:
        main([command, "--help"])
    except SystemExit as exit_info:
        assert exit_info.code == 0, f"bench {command} --help exited {exit_info.code}"
    assert capsys.readouterr().out.startswith(f"usage: bench {command}")


def test_every_test_file_named_in_the_docs_and_code_exists():
    # tests/ mirrors the layers; a test moved to another folder must not leave its old path behind
    texts = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "results").glob("*.md"),
             *(path for folder in ("bench", "modules", "datamodules", "tests") for path in (REPO / folder).rglob("*.py")),
             REPO / ".ci" / "run", REPO / "Makefile"]
    named = {match for path in texts for match in re.findall(r"tests/[\w/]+\.py", path.read_text())}
    assert "tests/cli/test_docs.py" in named or "tests/test_imports.py" in named
    assert sorted(name for name in named if not (REPO / name).is_file()) == []
