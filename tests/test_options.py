"""Typed method options (methods/options.py): every method's options are a frozen dataclass whose
defaults are the flags' defaults, values are converted and checked once, shared names agree on
their type, and no method reads its settings by string; dataset facts live in data/ only."""
import dataclasses
import os
import re

import pytest

import data
import methods
import utils
from cli import distill_flags
from methods.options import TOOLKIT, MethodOptions, option, option_specs
from pretrained import buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_NAMES = methods.list_methods()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_options_are_a_frozen_dataclass_with_typed_sourced_fields(name):
    cls = methods.get_method_class(name)
    options_type = cls.options_type
    assert dataclasses.is_dataclass(options_type) and issubclass(options_type, MethodOptions)
    assert options_type.__dataclass_params__.frozen
    defaults = options_type()
    for spec in cls.option_specs():
        # the declared default already has the flag's type (no silent conversion of a default)
        assert type(spec.default) is spec.type, (name, spec.name)
        assert spec.help and spec.source, (name, spec.name)
        assert spec.source == TOOLKIT or "/" in spec.source, (name, spec.name, spec.source)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, spec.name, spec.default)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_flag_defaults_are_the_dataclass_defaults(name):
    cls = methods.get_method_class(name)
    parser = distill_flags.build_parser()
    helps = {action.dest: action.help for action in parser._actions}
    per_dataset = cls.resolved_defaults("CIFAR10", 1, {})
    for spec in cls.option_specs():
        # --help names this method's default for the flag ("per dataset" when the dataset sets it)
        default = "per dataset" if spec.name in per_dataset else spec.default
        assert f"{name}: {default}" in helps[spec.name], (name, spec.name, helps[spec.name])
    # no option flag given: the method receives the dataclass defaults, and the per-dataset ones
    # (FRePo's use_flip: off on Fashion-MNIST, its dataclass default) are recorded in the config
    cfg, _ = distill_flags.resolve(parser.parse_args(["--method", name, "--dataset", "FashionMNIST"]))
    # (SRe2L's jitter 4 and its Iteration 1000 on Fashion-MNIST; shared flags such as Iteration go to the config)
    derived = cls.resolved_defaults("FashionMNIST", cfg.ipc, {})
    expected = {key: value for key, value in derived.items()
                if key != "zca" and key not in distill_flags.METHOD_DEFAULTED}
    assert dict(cfg.extra) == expected
    assert cls.resolve_options(cfg.extra) == cls.options_type(**expected)
    if "Iteration" in derived:
        assert cfg.iterations == derived["Iteration"]


def test_flags_arrive_typed_and_invalid_values_name_the_flag():
    parser = distill_flags.build_parser()
    cfg, _ = distill_flags.resolve(parser.parse_args(["--method", "DATM", "--dataset", "FashionMNIST",
                                                      "--syn_steps", "7", "--lr_y", "3", "--Sequential_Generation",
                                                      "False"]))
    options = methods.get_method_class("DATM").resolve_options(cfg.extra)
    assert (options.syn_steps, options.lr_y, options.Sequential_Generation) == (7, 3.0, False)
    assert type(options.lr_y) is float and options.expert_epochs == 2  # DATM's own default, not MTT's 3
    with pytest.raises(SystemExit):  # refused while parsing: the flag's type is the option's range
        parser.parse_args(["--method", "MTT", "--dataset", "FashionMNIST", "--syn_steps", "0"])
    with pytest.raises(ValueError, match="--syn_steps must be >= 1, got 0"):
        methods.get_method_class("MTT").resolve_options({"syn_steps": 0})
    with pytest.raises(ValueError, match="--kernel 'rbf': expected one of fc_ntk, fc_nngp, conv_rf"):
        methods.get_method_class("KIP").options_type(kernel="rbf")
    with pytest.raises(ValueError, match="--depth expects a int, got 'deep'"):
        methods.get_method_class("KIP").options_type(depth="deep")
    with pytest.raises(ValueError, match="method DM has no option lambda_1"):
        methods.get_method_class("DM").resolve_options({"lambda_1": 0.5})


def test_options_shared_between_methods_must_agree_on_their_type(monkeypatch):
    assert methods.method_options()["reg"][1] == ("FRePo", "KIP")  # one flag, two methods

    @dataclasses.dataclass(frozen=True)
    class ClashingOptions(MethodOptions):
        reg: int = option(1, "a ridge given as an integer", minimum=0, source=TOOLKIT)

    clash = type("Clash", (methods.DistillMethod,), {"options_type": ClashingOptions, "name": "Clash"})
    monkeypatch.setitem(methods.METHODS, "Clash", clash)
    with pytest.raises(TypeError, match="option 'reg' has type int in Clash but float in FRePo"):
        methods.method_options()


def test_a_numeric_option_without_a_range_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Unbounded(MethodOptions):
        steps: int = option(3, "steps", source=TOOLKIT)

    with pytest.raises(TypeError, match="Unbounded.steps: a numeric option declares its range"):
        option_specs(Unbounded)


def test_a_field_without_option_metadata_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bare(MethodOptions):
        steps: int = 3

    with pytest.raises(TypeError, match="Bare.steps"):
        option_specs(Bare)


# hparams["x"], options["x"] or resolve_options(...)["x"]: a setting read by its name as a string
STRING_LOOKUP = re.compile(r"hparams\[|\boptions\[|resolve_options\([^)]*\)\[")


def test_no_method_reads_its_settings_by_string():
    found = []
    for folder, _, names in os.walk(os.path.join(ROOT, "methods")):
        for file_name in names:
            if file_name.endswith(".py"):
                with open(os.path.join(folder, file_name)) as handle:
                    found += [f"{file_name}: {line.strip()}" for line in handle if STRING_LOOKUP.search(line)]
    assert found == []


def test_dataset_facts_cover_every_registered_dataset_and_serve_buffer_paths():
    for name in data.DATASETS:
        channel, size, classes = data.dataset_shape(name)
        assert channel in (1, 3) and len(size) == 2 and classes >= 2
    assert data.dataset_shape("imagenette") == (3, (data.DEFAULT_RES["ImageNet"],) * 2, 10)
    assert all(len(classes) == 10 for classes in data.IMAGENET_SUBSETS.values())
    assert buffers.effective_res("imagewoof", None) == data.DEFAULT_RES["ImageNet"] == 128
    assert buffers.effective_res("MHIST", None) == data.DEFAULT_RES["MHIST"] == 224
    assert buffers.dataset_folder("imagenette", False) == os.path.join("ImageNet", "imagenette", "128_NO_ZCA")
