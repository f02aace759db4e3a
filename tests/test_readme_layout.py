"""README.md's Layout section matches the tree, its links and docs/'s lead somewhere, and CI runs its test command.

    Layout     every package folder of sae_mcp/ (a folder with an __init__.py) and every top-level entry of the repo a
               clean checkout holds is named in the Layout block; every path the block names exists
    links      every relative link in README.md and docs/*.md points at a file or folder that exists, and at a
               heading when it names one
    Tests      .ci/run runs each command of the README's test command

Each check is a function of the text it reads, so the tests below also show it failing on text made up to be wrong.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"

# Top-level dot-entries are tooling (.gitignore, the caches of hypothesis, ruff or mypy), not the project's layout,
# except these.
DOT_ENTRIES_IN_LAYOUT = {".ci"}

# A markdown link's target: [text](target), the text possibly wrapped over lines; images too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def section(markdown: str, title: str) -> str:
    """The text under the `## title` heading, up to the next heading of level 2 or 1 ('' when there is none)."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^#{{1,2}} |\Z)", markdown, flags=re.M | re.S)
    return found.group(1) if found else ""


def layout_paths(markdown: str) -> list[str]:
    """The paths the Layout block names: the first column of each unindented line of its code block, where the
    column ends at two spaces; several paths in one column are separated by ', ' (globs allowed)."""
    block = re.search(r"^```\n(.*?)^```", section(markdown, "Layout"), flags=re.M | re.S)
    if block is None:
        return []
    paths = []
    for line in block.group(1).splitlines():
        if line and not line[0].isspace():
            paths += [p.strip() for p in re.split(r"\s{2,}", line, maxsplit=1)[0].split(", ")]
    return paths


def checkout_entries(root: Path) -> set[str]:
    """The top-level files and folders a clean checkout holds (a folder named with a trailing '/'): tracked ones and
    untracked ones git does not ignore; outside a git checkout, what is there less what .gitignore's patterns name."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        names = [line for line in out.splitlines() if line and (root / line).exists()]
    except (OSError, subprocess.CalledProcessError):
        ignore = [p.strip().strip("/") for p in (root / ".gitignore").read_text(encoding="utf-8").splitlines()
                  if p.strip() and not p.startswith("#")]
        names = [p.name + ("/x" if p.is_dir() else "") for p in root.iterdir()
                 if not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignore)]
    tops = {n.split("/")[0] + ("/" if "/" in n else "") for n in names}
    return {t for t in tops if not t.startswith(".") or t.rstrip("/") in DOT_ENTRIES_IN_LAYOUT}


def package_folders(root: Path) -> set[str]:
    """Every folder of sae_mcp/ with an __init__.py, sae_mcp/ itself included, as 'sae_mcp/x/'."""
    return {str(init.parent.relative_to(root)) + "/" for init in (root / "sae_mcp").rglob("__init__.py")
            if "__pycache__" not in init.parts}


def layout_problems(markdown: str, root: Path) -> list[str]:
    """What is wrong with the Layout section of `markdown` against the tree at `root` (empty when nothing is)."""
    named = layout_paths(markdown)
    if not named:
        return ["no Layout section with a code block"]
    problems = [f"the Layout names {p}, which does not exist" for p in named if not any(root.glob(p.rstrip("/")))]
    covered = {p.rstrip("/") for p in named}
    # A top-level entry is named as itself or by a path inside it (.ci/run names .ci/)
    covered_tops = covered | {p.split("/")[0] for p in covered}
    problems += [f"the Layout does not name the package folder {f}" for f in sorted(package_folders(root))
                 if f.rstrip("/") not in covered]
    problems += [f"the Layout does not name the top-level {t}" for t in sorted(checkout_entries(root))
                 if t.rstrip("/") not in covered_tops]
    return problems


def anchors(markdown: str) -> set[str]:
    """The anchors a markdown page's headings get, as GitHub makes them: lower case, punctuation but '-' dropped,
    spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(markdown: str, page: Path, root: Path) -> list[str]:
    """Relative links in `markdown` (the text of `page`) whose file or folder does not exist, that leave the repo at
    `root`, or whose anchor is no heading of the markdown page they name; web links are not checked."""
    broken = []
    for target in LINK.findall(markdown):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or not path.is_relative_to(root):
            broken.append(f"{page.relative_to(root)}: {target}")
        elif anchor and path.suffix == ".md":
            text = markdown if path == page else path.read_text(encoding="utf-8")
            if anchor not in anchors(text):
                broken.append(f"{page.relative_to(root)}: {target}")
    return broken


def readme_test_commands(markdown: str) -> list[str]:
    """The README's test command, one entry per command of its `&&` chain."""
    block = re.search(r"^```bash\n(.*?)^```", section(markdown, "Tests"), flags=re.M | re.S)
    return [c.strip() for c in block.group(1).split("&&")] if block else []


def ci_problems(markdown: str, ci_script: str) -> list[str]:
    """Commands of the README's test command that .ci/run (its text) does not run, each as a line of its own."""
    commands = readme_test_commands(markdown)
    if not commands:
        return ["no test command in the README's Tests section"]
    lines = {line.strip() for line in ci_script.splitlines()}
    return [f".ci/run does not run `{c}`" for c in commands if c not in lines]


def test_the_layout_names_every_package_folder_and_top_level_entry_and_only_paths_that_exist():
    assert layout_problems(README.read_text(encoding="utf-8"), REPO) == []


def test_the_layout_check_fails_on_a_made_up_path_and_on_a_folder_left_out():
    text = README.read_text(encoding="utf-8")
    made_up = text.replace("sae_mcp/results/   ", "sae_mcp/resultz/   ")
    assert made_up != text
    assert layout_problems(made_up, REPO) == [
        "the Layout names sae_mcp/resultz/, which does not exist",
        "the Layout does not name the package folder sae_mcp/results/",
    ]
    no_docs = re.sub(r"^docs/ .*\n", "", text, flags=re.M)
    assert layout_problems(no_docs, REPO) == ["the Layout does not name the top-level docs/"]
    assert layout_problems("# sae-mcp\n\n## Layout\n\nnone\n", REPO) == ["no Layout section with a code block"]


def test_every_relative_link_in_the_readme_and_docs_points_at_a_file_that_exists():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 10
    broken = [b for page in pages for b in broken_links(page.read_text(encoding="utf-8"), page, REPO)]
    assert broken == []


def test_the_link_check_fails_on_a_missing_file_and_on_a_path_out_of_the_repo():
    page = DOCS / "scoring.md"
    text = ("See [pages](pages.md), [the tests](../tests/), [x](nowhere.md#a), [up](../../etc/passwd),"
            " [web](https://x.y), [ok](security.md#running-on-a-remote-gpu-box),"
            " [no such heading](security.md#running-on-a-laptop).")
    assert broken_links(text, page, REPO) == ["docs/scoring.md: nowhere.md#a", "docs/scoring.md: ../../etc/passwd",
                                              "docs/scoring.md: security.md#running-on-a-laptop"]


def test_ci_runs_the_test_command_the_readme_gives():
    text = README.read_text(encoding="utf-8")
    assert "HF_HUB_OFFLINE=1 python -m pytest -q" in readme_test_commands(text)
    assert ci_problems(text, (REPO / ".ci" / "run").read_text(encoding="utf-8")) == []
    assert ci_problems(text, "ruff check .\npython -m pytest -q\n") == [
        ".ci/run does not run `mypy sae_mcp`", ".ci/run does not run `HF_HUB_OFFLINE=1 python -m pytest -q`"]
