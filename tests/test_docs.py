"""The documentation holds together: README.md stays a front page, and every relative link of README.md and
docs/*.md, and every docs/ path named in code, configs, scripts and the Makefile, points at something that exists
(for a #anchor: a heading of the target page, slugged as GitHub slugs it)."""
import os
import re
from pathlib import Path

from conftest import ROOT

README_LIMIT = 15_000
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/_incoming/ is not published yet
CODE_SUFFIXES = (".py", ".sh", ".toml")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "data", "runs", "checkpoints"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*[\w/]")


def prose_lines(text):
    """The lines of a Markdown text outside fenced and indented code blocks."""
    in_fence = in_indented = False
    previous_blank = True
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif in_fence:
            continue
        elif line.startswith(("    ", "\t")) and (previous_blank or in_indented):
            in_indented = True  # an indented code block starts after a blank line and runs to the next text
        elif not line.strip():
            previous_blank = True
            continue
        else:
            in_indented = False
            yield line
        previous_blank = False


def github_slug(heading):
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped (letters, digits,
    underscores, hyphens and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code and emphasis marks
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file; repeated slugs get -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def broken_links(page):
    """(link, why) for each relative link of a Markdown page that does not resolve."""
    bad = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                bad.append((target, f"no file {dest}"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append((target, f"no heading #{anchor} in {dest.name}"))
    return bad


def code_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(CODE_SUFFIXES) or name == "Makefile":
                yield Path(dirpath) / name


def missing_docs_paths(root):
    """(file, path) for each docs/... path named in a code, config or script file that does not exist."""
    missing = []
    for f in code_files(root):
        if f.resolve() == Path(__file__).resolve():  # this file names made-up pages on purpose
            continue
        for path in DOCS_PATH.findall(f.read_text(encoding="utf-8", errors="replace")):
            path = path.rstrip(".")
            if "*" not in path and "<" not in path and not (root / path).exists():
                missing.append((str(f.relative_to(root)), path))
    return missing


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters; the front page keeps to {README_LIMIT}: move text to docs/"


def test_every_relative_link_resolves():
    assert len(PAGES) > 1, "docs/*.md missing"
    bad = {p.name: broken_links(p) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_every_docs_path_named_in_code_exists():
    assert not missing_docs_paths(ROOT)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checkers report a missing file, a missing anchor and a missing docs/ path, and accept what exists,
    code blocks and inline code left alone."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n\n## Recipe (`configs/coco/`)\n\n## Speed\n\n## Speed\n\n### 2. Configs: the paper's recipe\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "See [page](docs/page.md), [recipe](docs/page.md#recipe-configscoco), [again](docs/page.md#speed-1),\n"
        "[step](docs/page.md#2-configs-the-papers-recipe), [web](https://example.org/x) and [top](#top).\n\n"
        "# Top\n\n    [not a link](nowhere.md)\n\n```\n[nor this](nowhere.md)\n```\n\n`[code](nowhere.md)`\n")
    assert broken_links(readme) == []
    readme.write_text("[gone](docs/gone.md) [bad anchor](docs/page.md#speeds) [self](#nothing)\n")
    assert [t for t, _ in broken_links(readme)] == ["docs/gone.md", "docs/page.md#speeds", "#nothing"]
    (tmp_path / "tool.py").write_text('"""See docs/page.md and docs/missing.md."""\n')
    (tmp_path / "Makefile").write_text("doc:\n\tcat docs/page.md docs/gone.md\n")
    assert sorted(missing_docs_paths(tmp_path)) == [("Makefile", "docs/gone.md"), ("tool.py", "docs/missing.md")]
