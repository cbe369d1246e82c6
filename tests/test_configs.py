"""The preset files under configs/: each parses and resolves for its method without warnings,
matches its path, yields to command-line flags, and spot-checked values equal the published settings."""
import glob
import os

import pytest
import yaml

import distill
from cli import distill_flags
import methods
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*", "*.yaml")))
IDS = [os.path.relpath(path, CONFIG_DIR) for path in FILES]

# The published cells (MTT author table, released DATM and PAD configs): every one must have its file.
EXPECTED = {
    "MTT": [(d, i) for d in ("CIFAR10", "CIFAR100", "Tiny") for i in (1, 10, 50)],
    "DATM": [("CIFAR10", i) for i in (1, 10, 50, 500, 1000)] + [("CIFAR100", i) for i in (1, 10, 50, 100)]
            + [("Tiny", i) for i in (1, 10, 50)],
}
EXPECTED["PAD"] = EXPECTED["DATM"]


def resolved(path, *flags):
    args = distill_flags.parse_args(["--config", path, *flags])
    cfg, opts = distill_flags.resolve(args)
    return args, cfg, opts


def test_every_published_cell_has_a_file():
    found = set(IDS)
    wanted = {f"{method}/{dataset}_ipc{ipc}.yaml" for method, cells in EXPECTED.items() for dataset, ipc in cells}
    assert found == wanted


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_preset_resolves_and_matches_its_name(path, capsys):
    method = os.path.basename(os.path.dirname(path))
    dataset, ipc = os.path.splitext(os.path.basename(path))[0].rsplit("_ipc", 1)
    args, cfg, opts = resolved(path)
    err = capsys.readouterr().err
    assert "is not used by --method" not in err, err
    assert cfg.method == method
    assert cfg.dataset == dataset
    assert cfg.ipc == int(ipc)
    # the method's own resolution accepts every option value given
    options = methods.get_method_class(method).resolve_options(cfg.extra)
    assert options.lr_teacher > 0
    if method != "MTT":
        assert cfg.zca is True and cfg.iterations == 10000 and opts.num_eval == 1 and cfg.batch_train == 128
        assert options.min_start_epoch < options.max_start_epoch
        if options.Sequential_Generation:
            assert options.current_max_start_epoch <= options.max_start_epoch


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_command_line_overrides_file(path, capsys):
    _, cfg, opts = resolved(path, "--Iteration", "7", "--ipc", "3", "--lr_lr", "0.5", "--num_eval", "2")
    assert (cfg.iterations, cfg.ipc, opts.num_eval) == (7, 3, 2)
    assert float(cfg.extra["lr_lr"]) == 0.5
    assert "is not used by --method" not in capsys.readouterr().err


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_float_values_are_yaml_floats(path):
    """YAML reads ``1e-5`` as a string; float flags must be written so that they load as floats."""
    parser = distill_flags.build_parser()
    float_flags = {a.dest for a in parser._actions if a.type is float}
    float_flags |= {name for name, (option, _) in methods.method_options().items() if option.type is float}
    with open(path) as handle:
        values = yaml.safe_load(handle)
    for key, value in values.items():
        if key in float_flags:
            assert isinstance(value, float), f"{key}: {value!r} loads as {type(value).__name__}"


def load(name):
    with open(os.path.join(CONFIG_DIR, name)) as handle:
        return yaml.safe_load(handle)


def test_spot_check_mtt_values():
    """The MTT author-provided table (justincui03/dc_benchmark ``methods/tm/readme.md``)."""
    cifar10_1 = load("MTT/CIFAR10_ipc1.yaml")
    assert {k: cifar10_1[k] for k in ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr",
                                      "lr_teacher", "zca", "model")} == dict(
        syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-7, lr_teacher=0.01, zca=True,
        model="ConvNet")
    assert cifar10_1.get("batch_syn", 0) == 0
    assert cifar10_1["Iteration"] == 5000 and cifar10_1["init"] == "real"
    cifar10_50 = load("MTT/CIFAR10_ipc50.yaml")
    assert (cifar10_50["lr_teacher"], cifar10_50["lr_img"], cifar10_50["zca"]) == (0.001, 1000.0, False)
    cifar100_50 = load("MTT/CIFAR100_ipc50.yaml")
    assert (cifar100_50["syn_steps"], cifar100_50["max_start_epoch"], cifar100_50["batch_syn"]) == (80, 40, 125)
    tiny_50 = load("MTT/Tiny_ipc50.yaml")
    assert (tiny_50["model"], tiny_50["lr_img"], tiny_50["lr_lr"], tiny_50["batch_syn"]) == ("ConvNetD4", 10000.0, 1e-4, 300)


def test_spot_check_datm_and_pad_values():
    """The released DATM YAMLs and PAD's differences from them."""
    datm_c10_1 = load("DATM/CIFAR10_ipc1.yaml")
    assert (datm_c10_1["lr_lr"], datm_c10_1["lr_y"], datm_c10_1["batch_syn"], datm_c10_1["threshold"],
            datm_c10_1["max_start_epoch"], datm_c10_1["Sequential_Generation"]) == (1e-7, 5.0, 10, 1.1, 4, False)
    datm_c10_50 = load("DATM/CIFAR10_ipc50.yaml")
    assert (datm_c10_50["current_max_start_epoch"], datm_c10_50["max_start_epoch"],
            datm_c10_50["expansion_end_epoch"], datm_c10_50["Sequential_Generation"]) == (20, 40, 2000, True)
    assert load("DATM/CIFAR100_ipc50.yaml")["init"] == "real"
    datm_tiny_10 = load("DATM/Tiny_ipc10.yaml")
    assert (datm_tiny_10["model"], datm_tiny_10["min_start_epoch"], datm_tiny_10["max_start_epoch"],
            datm_tiny_10["batch_syn"]) == ("ConvNetD4", 10, 50, 500)
    pad_c10_50 = load("PAD/CIFAR10_ipc50.yaml")
    assert (pad_c10_50["expert_epochs"], pad_c10_50["batch_syn"], pad_c10_50["loss_ratio"],
            pad_c10_50["depth_ratio"]) == (3, 1000, 0.25, 0.25)
    pad_c10_500 = load("PAD/CIFAR10_ipc500.yaml")
    assert (pad_c10_500["min_start_epoch"], pad_c10_500["current_max_start_epoch"], pad_c10_500["max_start_epoch"],
            pad_c10_500["expansion_end_epoch"], pad_c10_500["Sequential_Generation"]) == (40, 60, 70, 2000, True)
    pad_c100_1 = load("PAD/CIFAR100_ipc1.yaml")
    assert (pad_c100_1["current_max_start_epoch"], pad_c100_1["max_start_epoch"]) == (20, 30)
    assert load("PAD/CIFAR100_ipc50.yaml")["loss_ratio"] == 0.0
    # PAD keeps DATM's values where its configs list no difference
    datm, pad = load("DATM/Tiny_ipc50.yaml"), load("PAD/Tiny_ipc50.yaml")
    for key in ("syn_steps", "expert_epochs", "lr_img", "lr_lr", "lr_y", "batch_syn", "min_start_epoch",
                "max_start_epoch", "threshold", "init", "model"):
        assert datm[key] == pad[key], key


def test_unknown_key_is_a_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: MTT\nsyn_steps: 5\nnot_a_flag: 1\n")
    with pytest.raises(utils.UserError, match="not_a_flag"):
        distill_flags.parse_args(["--config", str(path)])


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(utils.UserError, match="no file"):
        distill_flags.parse_args(["--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("text, needle", [
    (b"ipc: &n 10\nIteration: *n\n", "aliases (*name) are not accepted"),  # a billion-laughs shape, small
    (b"ipc: 1\n\xff\xfe: 2\n", "not UTF-8 text"),
    (b"ipc: [1\n", "not valid YAML"),
])
def test_a_hostile_preset_is_one_line(tmp_path, text, needle):
    path = tmp_path / "preset.yaml"
    path.write_bytes(text)
    with pytest.raises(utils.UserError, match="--config") as refused:
        distill_flags.parse_args(["--config", str(path)])
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_a_preset_larger_than_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_flags, "CONFIG_MAX_BYTES", 64)
    path = tmp_path / "preset.yaml"
    path.write_text("ipc: 1\n" * 20)
    with pytest.raises(utils.UserError, match="a preset is at most 64 bytes"):
        distill_flags.parse_args(["--config", str(path)])
