"""KIP's reference settings: the colab's per-dataset normalisation (mean/std computed from the
training images, ``--norm_stats``), RFAD's defaults under ``--kernel conv_rf`` (resolved once,
overridden by explicit flags), its network without 28->32 padding, AdaBelief and Platt scaling."""
import dataclasses
import json

import pytest
import torch

import cli
import data
import distill
import networks
import utils
from cli import distill_flags
from data import DATASETS, RawSplits, load_dataset, train_statistics
from methods import kip as kip_module
from sets import checks
from tiny_data import build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks on a busy 2-core machine


def fake_loader(data_path, *, download=False, res=None, subset=None):
    """Two channels of 4x4 uint8 pixels with their own statistics (far from the fixed 0.5 / 0.25)."""
    generator = torch.Generator().manual_seed(3)
    train = torch.stack([torch.randint(0, 100, (60, 4, 4), generator=generator),
                         torch.randint(120, 255, (60, 4, 4), generator=generator)], dim=1).to(torch.uint8)
    test = torch.randint(0, 255, (10, 2, 4, 4), generator=generator).to(torch.uint8)
    return RawSplits(channel=2, im_size=(4, 4), class_names=["a", "b"], mean=[0.5, 0.5], std=[0.25, 0.25],
                     images_train=train, labels_train=torch.arange(60) % 2, images_test=test,
                     labels_test=torch.arange(10) % 2)


def test_train_statistics_are_the_datasets_own_mean_and_population_std(monkeypatch):
    monkeypatch.setitem(DATASETS, "KipFake", fake_loader)
    pixels = fake_loader("").images_train.double() / 255
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3), unbiased=False)  # np.std: ddof 0, as the colab
    computed_mean, computed_std = train_statistics(pixels.float())
    assert torch.allclose(torch.tensor(computed_mean, dtype=torch.float64), mean, atol=1e-7)
    assert torch.allclose(torch.tensor(computed_std, dtype=torch.float64), std, atol=1e-7)
    record = load_dataset("KipFake", normalize_like=data.TRAIN_STATS)
    assert record.normalization == "train_stats"
    assert torch.allclose(torch.tensor(record.mean, dtype=torch.float64), mean, atol=1e-6)
    assert torch.allclose(torch.tensor(record.std, dtype=torch.float64), std, atol=1e-6)
    normalised = record.images_train.double()
    assert torch.allclose(normalised.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(normalised.std(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5)
    dc = load_dataset("KipFake")  # the fixed statistics, as before
    assert dc.normalization == "own" and dc.mean == [0.5, 0.5] and dc.std == [0.25, 0.25]
    assert load_dataset("KipFake", normalize_like=data.TRAIN_STATS, zca=True).normalization == "zca"


def test_train_statistics_refuse_a_constant_channel():
    with pytest.raises(data.DatasetError, match="constant"):
        train_statistics(torch.ones(3, 1, 2, 2))


@pytest.mark.parametrize("argv,expected", [
    (["--method", "KIP"], data.TRAIN_STATS),
    (["--method", "KIP", "--norm_stats", "dc"], None),
    (["--method", "KIP", "--zca"], None),
    (["--method", "DM"], None),
    (["--method", "DM", "--norm_stats", "train"], data.TRAIN_STATS),
    (["--method", "KIP", "--dataset", "CIFAR100", "--norm_stats", "dc", "--cifar100_stats", "cifar10"], "CIFAR10"),
])
def test_kip_normalises_with_the_training_statistics_unless_told_otherwise(argv, expected):
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(argv))
    assert cfg.normalize_like == expected  # recorded in config.yaml and results.json


def test_distill_loads_kip_data_with_the_training_statistics_and_records_them(tmp_path, monkeypatch):
    seen = []

    def load(args, *rest, **kwargs):
        seen.append(cli.normalize_like(args, kwargs.get("cifar100_stats_default", "cifar100"),
                                       kwargs.get("norm_stats_default", "dc")))
        return tiny_record()

    monkeypatch.setattr("cli.load_record", load)
    run_dir = tmp_path / "run"
    assert distill.main(["--method", "KIP", "--dataset", "FashionMNIST", "--ipc", "1", "--Iteration", "1",
                         "--target_batch_size", "12", "--num_eval", "0", "--run_dir", str(run_dir), "--threads", "1",
                         "--no-vis"]) == 0
    assert seen == [data.TRAIN_STATS]
    assert '"normalize_like": "train"' in json.dumps(json.loads((run_dir / "results.json").read_text()))


def test_conv_rf_takes_rfads_defaults_when_flags_are_left_out():
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--method", "KIP", "--kernel", "conv_rf"]))
    options = kip_module.KIP.resolve_options(cfg.extra)
    assert cfg.lr_img == 1e-3 and options.reg == 5e-3 and options.img_optimizer == "adabelief"
    assert options.target_sampling == "uniform" and options.n_batches == 4 and options.target_batch_size == 1280
    assert options.rf_model == "ConvNetRFAD" and options.n_models == 8 and options.platt is False
    # the exact kernels keep the colab's
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--method", "KIP"]))
    options = kip_module.KIP.resolve_options(cfg.extra)
    assert cfg.lr_img == 0.04 and options.reg == 1e-6 and options.img_optimizer == "adam"
    assert options.target_sampling == "balanced" and options.n_batches == 1 and options.target_batch_size == 5000


def test_explicit_flags_override_rfads_defaults():
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(
        ["--method", "KIP", "--kernel", "conv_rf", "--lr_img", "0.02", "--reg", "1e-4", "--img_optimizer", "adam",
         "--target_sampling", "balanced", "--n_batches", "2", "--target_batch_size", "300", "--platt", "true"]))
    options = kip_module.KIP.resolve_options(cfg.extra)
    assert cfg.lr_img == 0.02 and options.reg == 1e-4 and options.img_optimizer == "adam"
    assert options.target_sampling == "balanced" and options.n_batches == 2 and options.target_batch_size == 300
    assert options.platt is True


def test_rfad_network_is_width_256_without_normalisation_or_grey_padding():
    net = networks.create_network("ConvNetRFAD", 1, 10, (28, 28))
    assert net.feature_shape == (256, 3, 3)  # 28 -> 14 -> 7 -> 3 (DC's padding would give 4 x 4)
    assert net.blocks[0].conv.padding == (1, 1) and isinstance(net.blocks[0].norm, torch.nn.Identity)
    assert networks.create_network("ConvNetNN", 1, 10, (28, 28)).feature_shape == (128, 4, 4)


def test_uniform_targets_are_n_batches_of_distinct_images_over_all_classes():
    record = tiny_record(num_classes=3, per_class=24)
    method = build_method("KIP", record, target_sampling="uniform", n_batches=3, target_batch_size=20)
    images, targets = method.sample_targets()
    assert images.shape[0] == 60 and targets.shape == (60, 3)
    train = record.images_train.reshape(len(record.images_train), -1)
    for batch in images.reshape(3, 20, -1):
        index = [int((train == row).all(1).nonzero()[0]) for row in batch]
        assert len(set(index)) == 20  # without replacement within a batch
    labels = targets.argmax(1)
    assert torch.equal(record.labels_train[[int((train == row).all(1).nonzero()[0]) for row in
                                            images.reshape(60, -1)]], labels)
    balanced = build_method("KIP", record, n_batches=2, target_batch_size=9)
    _, targets = balanced.sample_targets()
    assert torch.equal(targets.argmax(1).bincount(), torch.tensor([6, 6, 6]))


def test_adabelief_is_rfads_without_rectification_and_steps_the_support():
    record = tiny_record()
    method = build_method("KIP", record, img_optimizer="adabelief", target_batch_size=30, lr_img=0.01)
    syn = method.init_synthetic()
    from timm.optim import AdaBelief

    assert isinstance(method.optimizer_img, AdaBelief)
    group = method.optimizer_img.param_groups[0]
    assert group["eps"] == 1e-16 and group["rectify"] is False and group["weight_decay"] == 0.0
    before = syn.images.detach().clone()
    method.step(syn, 1)
    # AdaBelief's first step: m = g/10, s = (g - m)^2/1000, bias-corrected g / (0.9 |g|): lr / 0.9
    # per pixel (Adam's first step is lr).
    moved = (syn.images.detach() - before).abs()
    assert moved.max().item() == pytest.approx(0.01 / 0.9, rel=1e-4)


def test_platt_loss_is_cross_entropy_of_scaled_predictions_and_learns_its_temperature():
    pred = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.1]], dtype=torch.float64)
    targets = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]], dtype=torch.float64)
    k = torch.tensor(0.7, dtype=torch.float64)
    logits = torch.exp(k) * pred
    expected = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 2]) / 2
    assert torch.isclose(kip_module.platt_loss(pred, targets, k), expected)
    record = tiny_record()
    method = build_method("KIP", record, platt=True, target_batch_size=30, lr_img=0.01)
    syn = method.init_synthetic()
    assert method.optimizer_img.param_groups[1]["lr"] == kip_module.PLATT_LR
    logs = method.step(syn, 1)
    assert "platt_k" in logs and logs["platt_k"].item() != 0.0
    state = method.state_dict()
    other = build_method("KIP", record, platt=True, target_batch_size=30, lr_img=0.01)
    other.init_synthetic()
    other.load_state_dict(state)
    assert other.platt_k.item() == method.platt_k.item()


def test_a_conv_rf_run_records_rfads_settings(tmp_path, monkeypatch):
    monkeypatch.setattr("cli.load_record", lambda *args, **kwargs: tiny_record())
    run_dir = tmp_path / "run"
    assert distill.main(["--method", "KIP", "--dataset", "FashionMNIST", "--kernel", "conv_rf", "--n_models", "2",
                         "--ipc", "1", "--Iteration", "2", "--num_eval", "0", "--run_dir", str(run_dir),
                         "--threads", "1", "--no-vis"]) == 0
    config = json.loads((run_dir / "results.json").read_text())
    text = json.dumps(config)
    for needle in ('"lr_img": 0.001', '"reg": 0.005', '"img_optimizer": "adabelief"', '"target_sampling": "uniform"',
                   '"n_batches": 4', '"target_batch_size": 1280'):
        assert needle in text, needle


def test_evaluating_a_set_normalised_otherwise_names_norm_stats():
    record = tiny_record(channel=1)
    record.mean, record.std = [0.2861], [0.3530]
    meta = {"mean": [0.28604060219395294], "std": [0.3530242495012941], "zca": None}
    with pytest.raises(utils.UserError, match="--norm_stats"):
        checks.check_preprocessing("SET", meta, record)
    checks.check_preprocessing("SET", {**meta, "mean": [0.2861], "std": [0.3530]}, record)


def test_evaluating_a_whitened_set_without_zca_or_the_reverse_is_refused():
    record = tiny_record(channel=1)
    whitened = {"mean": [0.0], "std": [1.0], "zca": {"mean": torch.zeros(1)}}
    with pytest.raises(utils.UserError, match="pass --zca"):
        checks.check_preprocessing("SET", whitened, record)
    with pytest.raises(utils.UserError, match="leave --zca out"):
        checks.check_preprocessing("SET", {**whitened, "zca": None}, dataclasses.replace(record, zca=object()))
    checks.check_preprocessing("SET", {"mean": [0.0], "std": [1.0]}, record)  # no record: not checked


def test_evaluate_takes_zca_and_norm_stats_from_the_sets_record_when_left_out(tmp_path, capsys):
    from cli import evaluate_flags
    from sets import files

    def saved(name, **meta):
        path = str(tmp_path / name)
        files.save_results(path, [[torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])]], {},
                           meta={"mean": [0.5], "std": [0.5], **meta})
        return path

    parse = evaluate_flags.build_parser().parse_args
    kip = saved("kip.pt", zca=None, normalize_like=data.TRAIN_STATS)
    whitened = saved("frepo.pt", zca={"mean": torch.zeros(1)}, normalize_like=None)
    plain = saved("dm.pt", zca=None, normalize_like=None)
    args = evaluate_flags.adopt_recorded_data_flags(parse(["--syn_path", kip]), [kip])
    assert (args.zca, args.norm_stats) == (False, "train") and "--norm_stats train" in capsys.readouterr().err
    args = evaluate_flags.adopt_recorded_data_flags(parse(["--syn_path", whitened]), [whitened])
    assert (args.zca, args.norm_stats) == (True, None) and "--zca" in capsys.readouterr().err
    args = evaluate_flags.adopt_recorded_data_flags(parse(["--syn_path", plain]), [plain])
    assert (args.zca, args.norm_stats) == (False, None) and capsys.readouterr().err == ""
    # flags given win (sets.checks.check_preprocessing then refuses what disagrees); mixed sets decide nothing
    args = evaluate_flags.adopt_recorded_data_flags(parse(["--syn_path", whitened, "--no-zca", "--norm_stats", "dc"]),
                                                    [whitened, kip])
    assert (args.zca, args.norm_stats) == (False, "dc")
    args = evaluate_flags.adopt_recorded_data_flags(parse(["--syn_path", plain]), [whitened, plain, kip])
    assert (args.zca, args.norm_stats) == (False, None)
