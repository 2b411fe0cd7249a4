"""The README and the docs pages: every link resolves (files and in-page anchors), the README stays short enough to
read in five minutes, and the commands it gives for a fresh machine are the ones CI runs."""

import re
from pathlib import Path

import pytest

from helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    return {anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list:
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+://|mailto:", target):
            continue  # the web is not checked here (no network in tests)
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](#nowhere) ![pic](pic.png)\n")
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: #nowhere (no such heading)",
        "page.md: pic.png (no such file)",
    ]


def test_readme_is_short_with_a_table_of_contents():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260
    assert any(line.strip().lower() in ("## contents", "**contents**") for line in lines)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -r requirements-dev.txt" in readme and "-r requirements-dev.txt" in ci
    assert "-m pytest -q Testing" in readme and "-m pytest -q Testing" in ci


@pytest.mark.slow
def test_the_readme_training_example_trains_and_exports(tmp_path, monkeypatch):
    """The README's minimal config, as printed there, trains on two phantoms and exports a package that segments."""
    import json

    from AbdomenSegLib.cli import main

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Training your own model", 1)[1]
    config = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    monkeypatch.chdir(tmp_path)
    for i, case in enumerate(("case1", "case2")):
        assert (
            main(["phantom", f"data/images/{case}.nii.gz", "--labels", f"data/labels/{case}.nii.gz", "--seed", str(i)])
            == 0
        )
    (tmp_path / "my_config.json").write_text(json.dumps(config))
    assert main(["train", "my_config.json", "--out", "runs/tiny"]) == 0
    assert (tmp_path / "runs" / "tiny" / "package" / "card.json").is_file()
    assert main(["segment", "data/images/case2.nii.gz", "out.nii.gz", "--model", "runs/tiny/package"]) in (0, 3)
