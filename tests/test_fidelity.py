"""Reference fidelity: run counts, evaluation pools per family, CAFE's accuracy watchers and the
trajectory family's CIFAR-100 normalisation."""
import glob
import os

import pytest
import torch

import networks
import utils
from cli import distill_flags, evaluate_flags
from conftest import ROOT
from sets import checks

# Reference run counts (--num_exp, --num_eval): DC/DSA main.py and DM main_DM.py 5 x 20,
# main_DataDAM.py 1 x 10, CAFE distill.py 1 x 20, MTT distill.py 1 x 5 (DATM and PAD alike).
RUN_COUNTS = {"DC": (5, 20), "DSA": (5, 20), "DM": (5, 20), "DataDAM": (1, 10), "CAFE": (1, 20),
              "MTT": (1, 5), "DATM": (1, 5), "PAD": (1, 5)}
MTT_M_POOL = ["ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"]
DC_M_POOL = ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"]


def resolve(*flags):
    return distill_flags.resolve(distill_flags.parse_args(list(flags)))


@pytest.mark.parametrize("method", sorted(RUN_COUNTS))
def test_run_counts_default_to_the_reference_script(method):
    _, opts = resolve("--method", method)
    assert (opts.num_exp, opts.num_eval) == RUN_COUNTS[method]


@pytest.mark.parametrize("method", ["DC", "DataDAM", "MTT"])
def test_explicit_run_counts_win(method):
    _, opts = resolve("--method", method, "--num_exp", "3", "--num_eval", "7")
    assert (opts.num_exp, opts.num_eval) == (3, 7)
    _, opts = resolve("--method", method, "--num_eval", "0")
    assert opts.num_eval == 0 and opts.num_exp == RUN_COUNTS[method][0]


def test_bad_run_count_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:  # refused while parsing (its declared range)
        resolve("--method", "MTT", "--num_exp", "0")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --num_exp must be >= 1, got 0"]


def test_family_pools():
    assert networks.get_eval_pool("M", "ConvNet", family="MTT") == MTT_M_POOL
    assert networks.get_eval_pool("M", "ConvNet") == DC_M_POOL
    # Pools the family does not redefine are DC's.
    assert networks.get_eval_pool("D", "ConvNet", family="MTT") == ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"]
    assert networks.get_eval_pool("SS", "ConvNetBN", family="MTT") == ["ConvNetBN"]
    with pytest.raises(ValueError, match="unknown pool family"):
        networks.get_eval_pool("M", "ConvNet", family="XYZ")


@pytest.mark.parametrize("method, pool", [("DC", DC_M_POOL), ("DM", DC_M_POOL), ("CAFE", DC_M_POOL),
                                          ("DataDAM", DC_M_POOL), ("MTT", MTT_M_POOL), ("DATM", MTT_M_POOL),
                                          ("PAD", MTT_M_POOL)])
def test_each_family_takes_its_own_m_pool(method, pool):
    _, opts = resolve("--method", method, "--eval_mode", "M")
    assert list(opts.eval_models) == pool


def test_evaluate_pool_family_flag():
    parser = evaluate_flags.build_parser()
    args = parser.parse_args(["--syn_path", "x", "--eval_mode", "M"])
    assert evaluate_flags.resolve_models(args) == DC_M_POOL
    args = parser.parse_args(["--syn_path", "x", "--eval_mode", "M", "--pool_family", "MTT"])
    assert evaluate_flags.resolve_models(args) == MTT_M_POOL


# ---- CAFE's accuracy watchers (kaiwang960112/CAFE distill.py) ----------------------------------
def test_reference_accumulator_carries_one_tenth_of_the_previous_value():
    from methods.cafe import AccuracyWatcher

    watcher = AccuracyWatcher(window=10, carry=0.1)
    stored = [watcher.add(0.5) for _ in range(10)]
    assert stored[:3] == pytest.approx([0.5, 0.55, 0.555])
    assert watcher.span() == pytest.approx(0.5 * (1 - 0.1 ** 9) / 9, rel=1e-9)  # about 0.111 * 0.5
    clean = AccuracyWatcher(window=10)
    assert [clean.add(0.5) for _ in range(9)] == [0.5] * 9 and clean.span() is None
    clean.add(0.5)
    assert clean.span() == 0.0


def scripted_cafe(monkeypatch, watcher, accuracy=0.5, max_inner_steps=15):
    """CAFE on 10 tiny classes with the reference's window and thresholds; every accuracy
    reading is ``accuracy`` and network epochs are counted, not run."""
    from methods import cafe as cafe_module
    from tiny_data import build_method, tiny_record

    record = tiny_record(num_classes=10, per_class=2, size=8)
    m = build_method("CAFE", record, ipc=1, batch_real=2, watcher_images=2, watcher=watcher,
                     max_outer_steps=30, max_inner_steps=max_inner_steps)
    assert (m.options.watcher_window, m.options.lambda_1, m.options.lambda_2) == (10, 0.04, 0.03)
    epochs = []
    monkeypatch.setattr(cafe_module.evaluation, "train_epoch", lambda *args, **kwargs: epochs.append(1))
    monkeypatch.setattr(m, "real_accuracy", lambda net: accuracy)
    return m, epochs


def test_reference_watcher_inner_loop_stops_after_exactly_ten_epochs(monkeypatch):
    m, epochs = scripted_cafe(monkeypatch, "reference")
    net = m.new_network()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    syn = m.init_synthetic()
    assert m.train_network(net, optimizer, syn, None) == 10
    assert m.train_network(net, optimizer, syn, None) == 10  # zeroed at the start of each inner loop
    assert len(epochs) == 20


def test_reference_watcher_outer_loop_needs_eleven_steps(monkeypatch):
    m, epochs = scripted_cafe(monkeypatch, "reference")
    logs = m.step(m.init_synthetic(), 1)
    # Steps 1-10: the ten readings span ~0.056 > lambda_1, so an inner loop (10 epochs) follows
    # each; step 11: the window 2..11 spans ~0.0056 < lambda_1.
    assert logs["outer_steps"] == 11 and logs["inner_epochs"] == 10 * 10 == len(epochs)


def test_reference_watcher_low_accuracy_lets_the_inner_loop_run_on(monkeypatch):
    # At accuracy 0.2 the span of ten readings is ~0.022 < lambda_2: the inner loop runs to its bound.
    m, _ = scripted_cafe(monkeypatch, "reference", accuracy=0.2, max_inner_steps=15)
    net = m.new_network()
    assert m.train_network(net, torch.optim.SGD(net.parameters(), lr=0.01), m.init_synthetic(), None) == 15


def test_clean_watcher_reads_the_plain_accuracy(monkeypatch):
    m, epochs = scripted_cafe(monkeypatch, "clean", max_inner_steps=15)
    net = m.new_network()
    # A steady accuracy never spans more than lambda_2: the inner loop runs to its bound ...
    assert m.train_network(net, torch.optim.SGD(net.parameters(), lr=0.01), m.init_synthetic(), None) == 15
    epochs.clear()
    # ... and the outer loop stops as soon as its window is full.
    logs = m.step(m.init_synthetic(), 1)
    assert logs["outer_steps"] == 10 and logs["inner_epochs"] == 9 * 15 == len(epochs)


def test_watcher_flag_defaults_to_reference_and_refuses_other_values():
    cfg, _ = resolve("--method", "CAFE")
    from methods.cafe import CAFE

    assert CAFE.resolve_options(cfg.extra).watcher == "reference"
    cfg, _ = resolve("--method", "CAFE", "--watcher", "clean")
    assert CAFE.resolve_options(cfg.extra).watcher == "clean"
    with pytest.raises(utils.UserError, match="--watcher 'tenth': expected one of reference, clean"):
        resolve("--method", "CAFE", "--watcher", "tenth")


# ---- CIFAR-100 normalised with CIFAR-10's statistics (MTT, DATM, PAD, CAFE) ------------------------
CIFAR100_MEAN = [0.5071, 0.4866, 0.4409]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


@pytest.fixture
def mini_cifar100(tmp_path, monkeypatch):
    """torchvision's ``cifar-100-python/`` layout with 4 train and 2 test images of 2 classes
    (torchvision's md5 check is bypassed: the files are generated)."""
    import pickle

    import numpy as np
    from torchvision import datasets

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("train", 4), ("test", 2)):
        blob = {"data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
                "fine_labels": [i % 2 for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(blob))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee"]}))
    monkeypatch.setattr(datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.CIFAR100, "_load_meta", lambda self: setattr(self, "classes", ["apple", "bee"]))
    return tmp_path


def test_cifar100_normalised_like_cifar10(mini_cifar100):
    import data

    own = data.load_dataset("CIFAR100", str(mini_cifar100))
    like = data.load_dataset("CIFAR100", str(mini_cifar100), normalize_like="CIFAR10")
    assert own.mean == pytest.approx(CIFAR100_MEAN) and own.normalization == "own"
    assert like.mean == pytest.approx(CIFAR10_MEAN) and like.std == pytest.approx(CIFAR10_STD)
    assert like.normalization == "CIFAR10"
    # The same pixels, normalised with CIFAR10's statistics.
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(like.images_train, own.denormalize(own.images_train).sub(mean).div(std), atol=1e-5)
    zca = data.load_dataset("CIFAR100", str(mini_cifar100), zca=True, normalize_like="CIFAR10")
    assert zca.normalization == "zca"
    with pytest.raises(data.DatasetError, match="cannot normalise like"):
        data.load_dataset("CIFAR100", str(mini_cifar100), normalize_like="MNIST")


@pytest.mark.parametrize("method, expected", [("MTT", "CIFAR10"), ("DATM", "CIFAR10"), ("PAD", "CIFAR10"),
                                              ("CAFE", "CIFAR10"), ("DC", None), ("DSA", None), ("DM", None),
                                              ("DataDAM", None)])
def test_cifar100_stats_default_per_method(method, expected):
    cfg, _ = resolve("--method", method, "--dataset", "CIFAR100")
    assert cfg.normalize_like == expected
    cfg, _ = resolve("--method", method, "--dataset", "CIFAR10")
    assert cfg.normalize_like is None  # other datasets keep their own statistics
    cfg, _ = resolve("--method", method, "--dataset", "CIFAR100", "--cifar100_stats", "cifar100")
    assert cfg.normalize_like is None
    cfg, _ = resolve("--method", method, "--dataset", "CIFAR100", "--cifar100_stats", "cifar10")
    assert cfg.normalize_like == "CIFAR10"


def test_distill_and_buffer_load_cifar100_with_cifar10_stats(mini_cifar100):
    import buffer
    import cli

    args = distill_flags.parse_args(["--method", "MTT", "--dataset", "CIFAR100", "--data_path", str(mini_cifar100)])
    record = cli.load_record(args, cifar100_stats_default="cifar10")
    assert record.mean == pytest.approx(CIFAR10_MEAN) and record.std == pytest.approx(CIFAR10_STD)
    args = buffer.build_parser().parse_args(["--dataset", "CIFAR100", "--data_path", str(mini_cifar100)])
    assert cli.normalize_like(args, "cifar10") == "CIFAR10"
    args = buffer.build_parser().parse_args(["--dataset", "CIFAR100", "--cifar100_stats", "cifar100"])
    assert cli.normalize_like(args, "cifar10") is None


# Absolute, so that the parametrisation is the same whatever directory pytest runs from.
CIFAR100_PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "CIFAR100_*.yaml")))


def test_there_are_cifar100_presets_to_check():
    assert len(CIFAR100_PRESETS) >= 3, CIFAR100_PRESETS


@pytest.mark.parametrize("path", CIFAR100_PRESETS, ids=lambda p: os.path.relpath(p, ROOT))
def test_cifar100_presets_use_cifar10_statistics(path, capsys):
    cfg, _ = resolve("--config", path)
    assert cfg.normalize_like == (None if cfg.zca else "CIFAR10")
    with open(path) as handle:
        assert __import__("yaml").safe_load(handle)["cifar100_stats"] == "cifar10"


def test_buffer_of_another_normalisation_is_refused(tmp_path):
    from pretrained import buffers

    directory = tmp_path / "buf"
    directory.mkdir()
    trajectory = [[torch.zeros(2)], [torch.ones(2)]]
    torch.save([trajectory], directory / "replay_buffer_0.pt")
    buffers.write_manifest(str(directory), {"format_version": 1, "config": {"dataset": "CIFAR100"},
                                            "normalization": "own", "num_experts": 1})
    facts = {"normalization": buffers.normalization_fact(False, "CIFAR10")}
    with pytest.raises(utils.UserError, match="normalization='own' but this run's data has normalization='CIFAR10'"):
        buffers.load_buffer(str(directory), data_facts=facts)
    assert len(buffers.load_buffer(str(directory), data_facts={"normalization": "own"})) == 1


def test_evaluate_refuses_a_set_of_another_normalisation(mini_cifar100):
    import data

    record = data.load_dataset("CIFAR100", str(mini_cifar100))
    saved = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "zca": None}
    with pytest.raises(utils.UserError, match="--cifar100_stats"):
        checks.check_preprocessing("set.pt", saved, record)
    like = data.load_dataset("CIFAR100", str(mini_cifar100), normalize_like="CIFAR10")
    checks.check_preprocessing("set.pt", saved, like)  # matches: no error
    checks.check_preprocessing("res.pt", {}, record)  # reference files record no mean/std
