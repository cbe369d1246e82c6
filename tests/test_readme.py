"""The documentation holds: README.md is an entry page (short, with the test command .ci/run
reads), every relative link in README.md and docs/*.md resolves (file and #anchor), docs/flags.md
is what scripts/flag_reference.py writes from the parsers today, and every stage command printed in
the documentation parses and resolves (flags known, values in range, presets found), so a command
copied from README.md, docs/ or configs/README.md does not fail on its flags."""
import glob
import os
import re
import shlex

import pytest

from conftest import ROOT, check_stage_command

DOCS = sorted(["README.md", "configs/README.md",
               *(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))])
# ``python3 distill.py ...`` and ``torchrun [its options] distill.py ...`` (README, multi-GPU).
COMMAND = re.compile(r"^\s*(?:python3? |(?:srun )?torchrun (?:--?\S+(?: (?!-)\S+)? )*?)"
                     r"(distill|evaluate|buffer|train_original)\.py (.*)$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def read(doc):
    with open(os.path.join(ROOT, doc)) as handle:
        return handle.read()


def documented_commands():
    found = []
    for doc in DOCS:
        lines = read(doc).splitlines()
        for number, line in enumerate(lines, 1):
            match = COMMAND.match(line)
            if not match:
                continue
            text = match.group(2)
            while text.rstrip().endswith("\\"):  # a command continued on the next lines
                text = text.rstrip()[:-1] + " " + lines[number].strip()
                number += 1
            text = text.split("  #")[0].split(" # ")[0]
            text = re.sub(r"\[[^\]]*\]", "", text)  # optional flags shown in brackets
            found.append(pytest.param(match.group(1), shlex.split(text), id=f"{doc}:{number}"))
    return found


COMMANDS = documented_commands()


def test_the_documentation_has_commands_to_check():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("stage,argv", COMMANDS)
def test_documented_command_parses(stage, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets are named relative to the checkout
    check_stage_command(stage, argv)


def test_readme_is_an_entry_page_with_the_test_command():
    lines = read("README.md").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to a page under docs/"
    marker = lines.index("<!-- test-command -->")  # .ci/run runs the line after the fence that follows
    assert lines[marker + 1] == "```bash" and lines[marker + 2] == "python3 -m pytest -q"
    for page in ("gradient-matching", "distribution-matching", "trajectory-matching",
                 "kernel-and-performance-matching", "coresets", "evaluation", "outputs", "scale-out", "flags"):
        assert f"(docs/{page}.md)" in read("README.md"), page


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but ``-`` and ``_``
    dropped, spaces turned into ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc):
    found, seen = set(), {}
    in_code = False
    for line in read(doc).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        anchor = github_anchor(line.lstrip("#"))
        count = seen.get(anchor, 0)  # GitHub numbers repeated headings: x, x-1, x-2
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def test_github_anchor_matches_githubs_rule():
    assert github_anchor(" Mixed precision (`--amp`)") == "mixed-precision---amp"
    assert github_anchor(" `train_original.py`") == "train_originalpy"
    assert github_anchor(" Coreset baselines, cross-architecture") == "coreset-baselines-cross-architecture"


def relative_links():
    found = []
    for doc in ("README.md", *(d for d in DOCS if d.startswith("docs/"))):
        text = re.sub(r"```.*?```", "", read(doc), flags=re.S)  # links inside code blocks are code
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            found.append(pytest.param(doc, target, id=f"{doc}->{target}"))
    return found


LINKS = relative_links()


def test_the_documentation_has_links_to_check():
    assert len(LINKS) >= 30


@pytest.mark.parametrize("doc,target", LINKS)
def test_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
    assert os.path.exists(resolved), f"{doc}: link to {target}: no file {os.path.relpath(resolved, ROOT)}"
    if anchor and resolved.endswith(".md"):
        assert anchor in anchors(os.path.relpath(resolved, ROOT)), \
            f"{doc}: link to {target}: no heading with anchor #{anchor} in {os.path.relpath(resolved, ROOT)}"


def test_flag_reference_is_up_to_date():
    from scripts import flag_reference

    assert flag_reference.render() == read("docs/flags.md"), \
        f"docs/flags.md is stale (the parsers changed); regenerate it with: {flag_reference.REGENERATE}"


def test_flag_reference_lists_every_flag_of_every_stage():
    from scripts import flag_reference

    text = read("docs/flags.md")
    for script, _ in flag_reference.STAGES:
        parser = flag_reference.parser_builder(script)()
        for action in parser._actions:
            for name in action.option_strings:
                if name not in ("-h", "--help"):
                    assert f"`{name}`" in text, f"{script} {name} missing from docs/flags.md"
