#!/usr/bin/env python3
"""Checks the relative links of the project's markdown files.

For README.md and every docs/**/*.md, each relative link `[text](path)`,
`[text](path#anchor)` or `[text](#anchor)` must name an existing file (or
folder), and an anchor must match a heading of the target markdown file,
slugged the way GitHub does it (lower case, punctuation other than `-` and
`_` removed, spaces to `-`, repeated headings suffixed `-1`, `-2`, ...).
Links inside fenced code blocks and inline code are ignored; http(s) and
mailto links are not checked (no network).

    python3 .ci/check-links.py              # check the repository; exit 1 on a broken link
    python3 .ci/check-links.py --self-test  # check that the checker catches broken links

Python 3 standard library only.
"""

from __future__ import annotations

import re
import sys
import tempfile
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or [text](target "title"); the text may hold one level of
# brackets (e.g. a link around `[[tokens]]`). Images ![alt](src) match too.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text."""
    # Inline markup that does not show in the rendered text.
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links, images
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    out = []
    for ch in text:
        if ch in "-_" or ch.isalnum():
            out.append(ch)
        elif ch == " ":
            out.append("-")
        elif unicodedata.category(ch).startswith(("L", "N", "M")):
            out.append(ch)
        # any other punctuation or symbol is dropped
    return "".join(out)


def lines_outside_fences(text: str):
    """(line number, line) for each line not inside a fenced code block."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and line.strip() == m.group(1):
            fence = None


def anchors(path: Path, cache: dict) -> set:
    if path not in cache:
        seen: dict = {}
        result = set()
        for _, line in lines_outside_fences(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
        # Explicit HTML anchors: <a name="x"> / id="x".
        for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")):
            result.add(m.group(1))
        cache[path] = result
    return cache[path]


def check_file(path: Path, root: Path, cache: dict) -> list:
    problems = []
    rel = path.relative_to(root)
    for number, line in lines_outside_fences(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        for m in LINK.finditer(line):
            target = m.group(1)
            if not target or EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            if file_part:
                dest = (path.parent / file_part).resolve()
                try:
                    dest.relative_to(root)
                except ValueError:
                    problems.append(f"{rel}:{number}: {target}: points outside the repository")
                    continue
                if not dest.exists():
                    problems.append(f"{rel}:{number}: {target}: no such file")
                    continue
            else:
                dest = path
            if anchor:
                if dest.is_dir() or dest.suffix.lower() != ".md":
                    problems.append(f"{rel}:{number}: {target}: anchor on a file that is not markdown")
                elif anchor not in anchors(dest, cache):
                    problems.append(
                        f"{rel}:{number}: {target}: no heading with anchor #{anchor} in "
                        f"{dest.relative_to(root)}"
                    )
    return problems


def markdown_files(root: Path) -> list:
    files = []
    if (root / "README.md").exists():
        files.append(root / "README.md")
    docs = root / "docs"
    if docs.is_dir():
        files.extend(sorted(docs.rglob("*.md")))
    return files


def check(root: Path) -> list:
    cache: dict = {}
    problems = []
    for path in markdown_files(root):
        problems.extend(check_file(path, root, cache))
    return problems


def self_test() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        (root / "docs").mkdir()
        (root / "README.md").write_text(
            "# Title\n\n"
            "[ok](docs/a.md#a-b_c-d) [ok](#title) [ok](docs/a.md#repeat-1) [ok](https://x.invalid/nope)\n"
            "[broken file](docs/missing.md)\n"
            "[broken anchor](docs/a.md#nope)\n"
            "```\n[in a fence](docs/missing-too.md)\n```\n"
            "`[inline code](docs/missing-three.md)`\n",
            encoding="utf-8",
        )
        (root / "docs" / "a.md").write_text(
            "# A: b_c `d`\n\n## Repeat\n\n## Repeat\n\n[up](../README.md#title) [self](#missing-here)\n",
            encoding="utf-8",
        )
        problems = check(root)
        expected = [
            "README.md:4: docs/missing.md: no such file",
            "README.md:5: docs/a.md#nope: no heading with anchor #nope in docs/a.md",
            "docs/a.md:7: #missing-here: no heading with anchor #missing-here in docs/a.md",
        ]
        if problems != expected:
            print("check-links self-test FAILED", file=sys.stderr)
            print("expected:\n  " + "\n  ".join(expected), file=sys.stderr)
            print("found:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
    cases = {
        "Several routers on PostgreSQL": "several-routers-on-postgresql",
        "EventIngest: PublishEvents": "eventingest-publishevents",
        "Ordering, lanes and batching": "ordering-lanes-and-batching",
        "`[console]` and TLS": "console-and-tls",
        "Durability, duplicates and retention": "durability-duplicates-and-retention",
    }
    for text, want in cases.items():
        if slug(text) != want:
            print(f"check-links self-test FAILED: slug({text!r}) = {slug(text)!r}, want {want!r}",
                  file=sys.stderr)
            return 1
    print("check-links self-test: broken links and anchors are caught")
    return 0


def main(argv: list) -> int:
    if argv[1:] == ["--self-test"]:
        return self_test()
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    files = markdown_files(ROOT)
    problems = check(ROOT)
    if problems:
        print(f"broken links ({len(problems)}):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"links: {len(files)} markdown files, every relative link resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
