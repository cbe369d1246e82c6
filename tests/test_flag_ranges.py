"""Every numeric flag of every stage declares its range where it is defined (its argparse type is a
``flag_types.Range``), and a value outside it is one line and exit code 2 while parsing.

The walk builds each stage's parser as the stage script does (``scripts/flag_reference.py``'s
``parser_builder``: distill.py's method and add-on flags from the registries included), finds every
numeric action (a ``Range`` type, a type that turns text into a number, or a numeric default) and
fails for one without a declared range. Parsing only: no data, no working-directory files.
"""
import argparse
import math

import pytest

import cli
import flag_types
import utils
from cli import distill_flags
from scripts import flag_reference

STAGES = tuple(script for script, _ in flag_reference.STAGES)
# What a stage needs on its command line besides the flag tried (evaluate.py: a source of sets).
REQUIRED = {"evaluate.py": ["--baseline", "random"]}
# Flags the walk must find (the issue's examples; a walk that finds nothing passes nothing).
RUNTIME = {"--threads", "--seed", "--dist_timeout"}  # cli.add_runtime_args, every stage
EXPECTED = {
    "distill.py": RUNTIME | {"--outer_loop", "--inner_loop", "--ipc", "--syn_steps", "--factor", "--lbd",
                             "--layer_idx", "--model_num", "--temperature", "--teacher_epoch"},
    "evaluate.py": RUNTIME | {"--num_eval", "--exp", "--lrs_lambda", "--lbd", "--assess_real"},
    "buffer.py": RUNTIME | {"--num_experts", "--rm_easy_ratio_first"},
    "train_original.py": RUNTIME | {"--random_seed", "--num", "--lr"},
}

_PARSERS = {}


def stage_parser(script: str) -> argparse.ArgumentParser:
    """``script``'s parser, built once (parsing does not change it)."""
    if script not in _PARSERS:
        _PARSERS[script] = flag_reference.parser_builder(script)()
    return _PARSERS[script]


def is_numeric(action: argparse.Action) -> bool:
    """Whether ``action`` takes a number: a ``Range`` type, a type that turns ``"1"`` or ``"0.5"``
    into an int or float, or no type with a numeric default (its value would arrive as text)."""
    if isinstance(action.type, flag_types.Range):
        return True
    if action.type is None:
        return isinstance(action.default, (int, float)) and not isinstance(action.default, bool) \
            and action.nargs != 0 and not isinstance(action, argparse._StoreConstAction)
    for probe in ("1", "0.5"):
        try:
            value = action.type(probe)
        except Exception:  # noqa: BLE001 (any refusal: not a numeric type for this probe)
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def numeric_actions(parser: argparse.ArgumentParser):
    """``{first option string: action}`` of every numeric optional flag of ``parser``."""
    return {action.option_strings[0]: action for action in parser._actions
            if action.option_strings and is_numeric(action)}


def unranged(parser: argparse.ArgumentParser):
    """The numeric flags of ``parser`` without a declared lower bound (``Range.minimum``)."""
    return sorted(flag for flag, action in numeric_actions(parser).items()
                  if not isinstance(action.type, flag_types.Range) or action.type.minimum is None)


def ranged_cases():
    return [pytest.param(script, flag, id=f"{script}{flag}")
            for script in STAGES for flag in numeric_actions(stage_parser(script))]


def parse_error(script, flag, value, capsys):
    """The one stderr line and exit code of parsing ``flag value`` with ``script``'s parser."""
    action = numeric_actions(stage_parser(script))[flag]
    with pytest.raises(SystemExit) as stop:
        stage_parser(script).parse_args([*REQUIRED.get(script, []), f"{flag}={value}"])  # -5e-324 is no option
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {flag} must be ") and "Traceback" not in lines[0], lines
    assert action.type.bounds_text() in lines[0], lines
    return stop.value.code


@pytest.mark.parametrize("script", STAGES)
def test_every_numeric_flag_declares_its_range(script):
    found = numeric_actions(stage_parser(script))
    assert EXPECTED[script] <= set(found), f"the walk missed {sorted(EXPECTED[script] - set(found))}"
    assert unranged(stage_parser(script)) == [], (
        f"{script}: numeric flags without a declared range; give them type=cli.positive_int, cli.at_least(0), "
        "cli.in_range(0, 1) ... (flag_types), or a minimum on their method option")


def test_the_walk_catches_a_flag_without_a_range():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rate", default=0.1)  # no type at all: the value would arrive as text
    parser.add_argument("--ratio", type=flag_types.Range(float, maximum=1.0))  # no lower bound
    parser.add_argument("--lr", type=cli.positive_float, default=0.01)
    parser.add_argument("--name", type=str.lower, default="x")
    parser.add_argument("--flag", action="store_true")
    assert unranged(parser) == ["--rate", "--ratio", "--steps"]


@pytest.mark.parametrize("script,flag", ranged_cases())
def test_a_value_below_the_range_is_one_line(script, flag, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing depends on the working directory
    allowed = numeric_actions(stage_parser(script))[flag].type
    below = allowed.below()
    assert parse_error(script, flag, str(below), capsys) == 2
    if allowed.kind is int:  # not an integer: refused with the range, not truncated
        for text in ("1e23", "1.5"):
            assert parse_error(script, flag, text, capsys) == 2
    else:
        for text in ("nan", "inf"):
            assert parse_error(script, flag, text, capsys) == 2
    if allowed.maximum is not None:
        assert parse_error(script, flag, str(allowed.above()), capsys) == 2


@pytest.mark.parametrize("script,flag", ranged_cases())
def test_the_range_is_not_stricter_than_declared(script, flag):
    action = numeric_actions(stage_parser(script))[flag]
    allowed = action.type
    if allowed.exclusive_minimum:
        edge = allowed.minimum + 1 if allowed.kind is int else math.nextafter(float(allowed.minimum), math.inf)
    else:
        edge = allowed.minimum
    parsed = getattr(stage_parser(script).parse_args([*REQUIRED.get(script, []), flag, repr(edge)]), action.dest)
    assert (parsed[0] if isinstance(parsed, list) else parsed) == edge
    # the defaults stay what they were, inside the range
    if action.default not in (None, argparse.SUPPRESS):
        assert allowed.contains(action.default) and type(action.default) is allowed.kind, action.default


def test_dc_loops_zero_and_negative_are_one_line_each(capsys):
    import distill

    for value, bound in (("-3", ">= 1"), ("0", ">= 1")):
        with pytest.raises(SystemExit) as stop:
            distill.main(["--method", "DC", "--dataset", "FashionMNIST", "--outer_loop", value])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and lines == [f"error: --outer_loop must be {bound}, got {value}"]
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "DC", "--dataset", "FashionMNIST", "--inner_loop", "-1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --inner_loop must be >= 0, got -1"]


def test_dc_loops_given_to_the_library_are_checked_too():
    import methods

    dc = methods.get_method_class("DC")
    for loops, message in (({"outer_loop": 0}, "--outer_loop must be >= 1, got 0"),
                           ({"inner_loop": -2}, "--inner_loop must be >= 0, got -2")):
        with pytest.raises(ValueError, match=message):
            dc.check_config(methods.DistillConfig(method="DC", dataset="Tiny3", **loops))
    dc.check_config(methods.DistillConfig(method="DC", dataset="Tiny3", outer_loop=1, inner_loop=0))


def test_seed_and_threads_of_the_issue(capsys):
    parser = stage_parser("distill.py")
    assert parse_error("distill.py", "--seed", "1e23", capsys) == 2
    assert parse_error("distill.py", "--threads", "-1", capsys) == 2
    assert parse_error("distill.py", "--seed", str(flag_types.SEED_MAX + 1), capsys) == 2
    assert parser.parse_args(["--seed", "0", "--threads", "1"]).seed == 0


def test_a_shared_method_flag_takes_the_loosest_range_and_each_method_its_own():
    # --factor: RDED from 0 (automatic), NCFM from 1; the flag refuses only what no method takes
    assert numeric_actions(stage_parser("distill.py"))["--factor"].type.minimum == 0
    with pytest.raises(utils.UserError, match="--factor must be >= 1, got 0"):
        distill_flags.resolve(stage_parser("distill.py").parse_args(["--method", "NCFM", "--factor", "0"]))


def test_a_preset_value_outside_the_range_is_one_line(tmp_path):
    preset = tmp_path / "preset.yaml"
    for text, needle in (("threads: -1\n", "threads: must be in [1, 1024], got -1"),
                         ("outer_loop: 0\n", "outer_loop: must be >= 1, got 0"),
                         ("lr_img: .nan\n", "lr_img: must be a finite number > 0, got nan")):
        preset.write_text(text)
        with pytest.raises(utils.UserError) as error:
            distill_flags.parse_args(["--config", str(preset)])
        assert needle in str(error.value) and "\n" not in str(error.value)


def test_range_texts_and_conversions():
    assert flag_types.positive_int("7") == 7 and flag_types.positive_int(7.0) == 7
    assert flag_types.fraction("0.25") == 0.25 and flag_types.fraction(1) == 1.0
    assert flag_types.in_range(0.0, 1.0, exclusive_maximum=True).describe() == "a number in [0, 1)"
    assert flag_types.Range(int, 1, none_word="none")("None") is None
    with pytest.raises(ValueError, match="must be >= 1, or none, got 0"):
        flag_types.Range(int, 1, none_word="none")("0")
    with pytest.raises(ValueError, match="must be an integer >= 0, got True"):
        flag_types.non_negative_int(True)
    with pytest.raises(ValueError, match=r"must be an integer >= 1, got 2\.5"):
        flag_types.positive_int(2.5)
    assert flag_types.positive_float.below() == 0.0 and flag_types.non_negative_int.below() == -1
    assert flag_types.non_negative_float.below() < 0 and flag_types.fraction.above() > 1
