"""Every stage command printed in the documentation parses and resolves (flags known, values in
range, presets found), so a command copied from README.md, docs/ or configs/README.md does not
fail on its flags."""
import os
import re
import shlex

import pytest

import buffer
import train_original
from cli import distill_flags, evaluate_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/reproduce.md", "docs/results.md", "configs/README.md"]
# ``python3 distill.py ...`` and ``torchrun [its options] distill.py ...`` (README, multi-GPU).
COMMAND = re.compile(r"^\s*(?:python3? |(?:srun )?torchrun (?:--?\S+(?: (?!-)\S+)? )*?)"
                     r"(distill|evaluate|buffer|train_original)\.py (.*)$")


def documented_commands():
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as handle:
            lines = handle.read().splitlines()
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
    if stage == "distill":
        distill_flags.resolve(distill_flags.parse_args(argv))
    elif stage == "evaluate":
        evaluate_flags.check_args(evaluate_flags.build_parser("").parse_args(argv))
    elif stage == "buffer":
        buffer.resolve(buffer.build_parser().parse_args(argv))
    else:
        train_original.resolve(train_original.build_parser().parse_args(argv))
