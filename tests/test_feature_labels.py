"""Privileged feature labels (DRUPI, --feature_labels), test-time augmentation and deterministic
evaluation, on tiny generated data (3 classes, 8x8 px, 1-3 iterations)."""
import json
import math
import os

import pytest
import torch

from cli import evaluate_flags
import torch.nn as nn
import torch.nn.functional as F

import distill
from cli import distill_flags
import evaluate
import methods
import networks
import evaluation
import utils
from sets import files
from data import RealSampler
from methods.addons.feature_loss import (FeatureLossConfig, FeatureTargets, classify_features, feature_distance,
                          forward_with_features)
from methods.addons.feature_labels import FeatureLabelConfig
from methods.runner import RunOptions, run_distillation
from tiny_data import build_mtt, tiny_record, with_addons

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


def build(name, record, **feature_flags):
    cls = methods.get_method_class(name)
    cfg = methods.DistillConfig(method=name, dataset=record.name, model=MODEL, ipc=2, iterations=2, batch_real=8,
                                batch_train=4, init="real", outer_loop=2, inner_loop=1,
                                dsa_strategy=cls.defaults.get("dsa_strategy", ""),
                                addons={"feature_labels": FeatureLabelConfig(**{"feat_init": "random", **feature_flags})})
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    torch.manual_seed(0)
    return with_addons(cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                           sampler=sampler, device=CPU, generator=utils.make_generator(0)), record)


# ----- the loss ---------------------------------------------------------------------------------
def test_feature_distance_mse_and_cos_match_hand_computation():
    e = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 4.0]])
    f = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    # mse: squared differences 0,1,4 | 0,0,16 -> 21 / 6
    assert feature_distance(e, f, "mse").item() == pytest.approx(21 / 6)
    # cos: row 1: e.f = 1, |e| = sqrt5, |f| = sqrt2; row 2: e.f = 9, |e| = 5, |f| = 3
    expected = ((1 - 1 / math.sqrt(10)) + (1 - 9 / 15)) / 2
    assert feature_distance(e, f, "cos").item() == pytest.approx(expected, rel=1e-6)
    assert feature_distance(e, e, "mmd").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(e, f, "mmd").item() > 0
    # avg pooling to 1x1 on both sides: a (1, 2, 2, 2) map of channel means 1.5 and 0 vs F = (1, 0)
    maps = torch.tensor([[[[1.0, 2.0], [1.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    labels = torch.tensor([[[[1.0]], [[0.0]]]])
    assert feature_distance(maps, labels, "mse", pooling="avg").item() == pytest.approx(0.25 / 2)
    assert feature_distance(maps, labels, "mse", pooling="sum").item() == pytest.approx(25 / 2)  # sum 6 vs 1
    # feat_norm: per-channel-vector L2 normalisation makes scaled features equal
    assert feature_distance(3 * e, e, "mse", norm=True).item() == pytest.approx(0.0, abs=1e-7)


def test_tap_and_classifier_use_the_network_own_layers():
    torch.manual_seed(0)
    net = networks.get_network("ConvNet", 1, 3, (16, 16), device=CPU)
    x = torch.randn(2, 1, 16, 16)
    logits, feats = forward_with_features(net, x)
    assert torch.allclose(logits, net(x), atol=1e-6) and feats.shape == (2, 128, 2, 2)
    assert torch.allclose(classify_features(net, feats), net(x), atol=1e-5)  # h(E(x)) = f(x), no random layer
    logits1, feats1 = forward_with_features(net, x, layer_idx=1)
    assert feats1.shape == (2, 128, 10, 10)  # 1-channel input: padding 3, 16 -> 20 -> pool 10 and torch.allclose(logits1, net(x), atol=1e-6)
    assert torch.allclose(classify_features(net, feats1, layer_idx=1), net(x), atol=1e-5)
    with pytest.raises(ValueError, match="layer_idx 4"):
        forward_with_features(net, x, layer_idx=4)


def test_training_loss_is_ce_plus_lambda_distance():
    torch.manual_seed(0)
    net = networks.get_network(MODEL, 1, 3, (8, 8), device=CPU)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    feats = torch.randn(2, 3, 32, 1, 1)  # n_feat 2, one per class; class-major ipc 2
    targets = FeatureTargets(feats, 6, 3, FeatureLossConfig(lbd=0.5))
    index = torch.tensor([5, 0, 3])
    logits, e = forward_with_features(net, x[index])
    expected = F.cross_entropy(logits, y[index]) + 0.5 * F.mse_loss(e, feats.mean(0)[torch.tensor([2, 0, 1])])
    assert targets.loss(net, x[index], y[index], index).item() == pytest.approx(expected.item(), rel=1e-6)


# ----- distillation -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DC", "DSA", "DM"])
def test_one_step_changes_features_and_images(one_thread, name):
    record = tiny_record(per_class=8)
    m = build(name, record, lbd=0.1, feat_lbd=0.1, pooling="avg")
    syn = m.init_synthetic()
    assert syn.features.shape == (1, 6, 32, 1, 1)
    features, images = syn.features.detach().clone(), syn.images.detach().clone()
    logs = {**m.step(syn, 1), **m.pop_addon_logs()}
    assert math.isfinite(float(logs["loss"])) and math.isfinite(float(logs["feat_loss"]))
    assert not torch.equal(syn.features, features)
    assert not torch.equal(syn.images, images)


def test_per_class_features_and_pretrained_init(one_thread):
    record = tiny_record(per_class=8)
    m = build("DC", record, feat_per="class", feat_init="pretrained", n_feat=2, use_feature="random")
    syn = m.init_synthetic()
    assert syn.features.shape == (2, 3, 32, 1, 1)
    before = syn.features.detach().clone()
    m.step(syn, 1)
    assert not torch.equal(syn.features, before)


# ----- evaluation -------------------------------------------------------------------------------
def _eval(record, images, labels, features=None, lbd=0.1, **cfg):
    eval_cfg = evaluation.EvalConfig(epochs=2, batch_train=4, **cfg)
    return evaluation.evaluate_synset(images, labels, MODEL, record.num_classes, record.images_test, record.labels_test,
                                 eval_cfg, num_eval=2, device=CPU, seed=3,
                                 term=(FeatureTargets(features, images.shape[0], record.num_classes,
                                                      FeatureLossConfig(lbd=lbd))
                                       if features is not None and lbd > 0 else None)).accs


def test_lambda_zero_equals_no_features_and_lambda_positive_trains_differently(one_thread):
    record = tiny_record(per_class=8)
    images, labels = record.images_train[::4], record.labels_train[::4]
    features = 5 * torch.randn(1, images.shape[0], 32, 1, 1)
    plain = _eval(record, images, labels)
    assert _eval(record, images, labels, features, lbd=0.0) == plain
    # lbd > 0 changes training: compare the networks' weights after one epoch
    net_a = networks.get_network(MODEL, 1, 3, (8, 8), device=CPU)
    net_b = networks.get_network(MODEL, 1, 3, (8, 8), device=CPU)
    net_b.load_state_dict(net_a.state_dict())
    targets = FeatureTargets(features, images.shape[0], 3, FeatureLossConfig(lbd=1.0))
    for net, feats in ((net_a, None), (net_b, targets)):
        evaluation.train_epoch(net, images, labels, torch.optim.SGD(net.parameters(), lr=0.1), 4, utils.make_generator(0),
                          term=feats)
    assert not torch.equal(net_a.classifier.weight, net_b.classifier.weight)


def test_mismatched_features_are_a_clear_error():
    record = tiny_record(per_class=8)
    images, labels = record.images_train[::4], record.labels_train[::4]
    with pytest.raises(ValueError, match="differ in shape"):
        _eval(record, images, labels, torch.zeros(1, images.shape[0], 7, 1, 1))


class _Recorder(nn.Module):
    """A linear classifier recording the batch sizes it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 3)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.linear(x.flatten(1))


def test_tta_hflip_on_flip_invariant_images_equals_no_tta():
    torch.manual_seed(0)
    half = torch.randn(20, 1, 8, 4)
    images = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric
    labels = torch.randint(0, 3, (20,))
    net = _Recorder()
    plain = evaluation.test_accuracy(net, images, labels)
    assert evaluation.test_accuracy(net, images, labels, tta_mode="hflip") == plain
    # on asymmetric images the flipped view is really used: the prediction is argmax(p(x) + p(flip x))
    asym = torch.randn(20, 1, 8, 8)
    with torch.no_grad():
        expected = (torch.softmax(net(asym), 1) + torch.softmax(net(asym.flip(-1)), 1)).argmax(1)
    assert evaluation.test_accuracy(net, asym, expected, tta_mode="hflip") == 1.0
    with pytest.raises(ValueError, match="tta_mode"):
        evaluation.test_accuracy(net, images, labels, tta_mode="fivecrop")


def test_deterministic_accuracy_does_not_depend_on_the_test_batch_size(one_thread):
    net = _Recorder()
    images, labels = torch.randn(70, 1, 8, 8), torch.randint(0, 3, (70,))
    passes = []
    for batch in (7, 1000):
        net.sizes.clear()
        evaluation.test_accuracy(net, images, labels, batch_size=batch, deterministic=True)
        passes.append(list(net.sizes))
    assert passes[0] == passes[1]  # the same passes whatever batch_test
    record = tiny_record(per_class=8)
    images, labels = record.images_train[::4], record.labels_train[::4]
    accs = [_eval(record, images, labels, deterministic=True, batch_test=b) for b in (5, 1000)]
    assert accs[0] == accs[1]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the evaluation


# ----- saving, loading and the command lines -----------------------------------------------------
def test_run_saves_features_third_and_evaluate_reads_sets_with_and_without(one_thread, tmp_path, monkeypatch, capsys):
    record = tiny_record(per_class=8)
    feature_cfg = FeatureLabelConfig(lbd=0.2, feat_init="random", pooling="avg")
    cfg = methods.DistillConfig(method="DM", dataset=record.name, model=MODEL, ipc=1, iterations=1, batch_real=4,
                                init="real", dsa_strategy="", addons={"feature_labels": feature_cfg})
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=(MODEL,), epoch_eval_train=1, run_dir=str(tmp_path / "run"),
                      save_vis=False, tta_mode="hflip", deterministic=True)
    outcome = run_distillation(cfg, opts, record, CPU)
    blob = files.load_results(outcome.result_path)
    images, labels, features = blob["data"][0]
    assert features.shape == (1, 3, 32, 1, 1)
    assert blob["meta"]["config"]["feature_labels"]["lbd"] == 0.2
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert results["protocol"][MODEL]["tta"].startswith("hflip") and results["protocol"][MODEL]["deterministic"]
    assert results["feature_labels"]["lbd"] == 0.2 and results["feature_labels"]["pooling"] == "avg"

    monkeypatch.setattr("data.load_dataset", lambda *a, **k: record)
    args = evaluate_flags.build_parser().parse_args(["--syn_path", outcome.result_path, "--dataset", record.name])
    _, found, _ = evaluate_flags.load_set(outcome.result_path, args, record)
    assert torch.equal(found[0].term.features, features) and found[0].term.cfg.lbd == 0.2
    assert found[0].term.cfg.pooling == "avg"
    args = evaluate_flags.build_parser().parse_args(["--syn_path", outcome.result_path, "--dataset", record.name, "--lbd", "0"])
    assert evaluate_flags.load_set(outcome.result_path, args, record)[1][0].term is None
    common = ["--dataset", record.name, "--model", MODEL, "--num_eval", "1", "--epoch_eval_train", "1", "--device", "cpu"]
    assert evaluate.main(["--syn_path", outcome.result_path, "--tta", "--deterministic", *common]) == 0
    # the same set without F (two entries, as before) still evaluates
    plain_path = str(tmp_path / "plain.pt")
    files.save_results(plain_path, [[images, labels]], {})
    args = evaluate_flags.build_parser().parse_args(["--syn_path", plain_path, "--dataset", record.name])
    assert evaluate_flags.load_set(plain_path, args, record)[1][0].term is None
    assert evaluate.main(["--syn_path", plain_path, *common]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(MODEL) and "networks" in line]
    first = [line for line in lines if os.path.basename(outcome.result_path) in line]
    second = [line for line in lines if "plain.pt" in line]
    assert len(first) == 1 and len(second) == 1
    assert "feature labels, lbd 0.2" in first[0] and "feature labels" not in second[0]


def test_distill_flags_build_the_feature_config():
    args = distill_flags.parse_args(["--method", "DC", "--dataset", "MNIST", "--feature_labels", "--lbd", "0.1",
                               "--feat-lbd", "0.05", "--layer-idx", "2", "--pooling", "avg", "--feat_metric", "cos",
                               "--tta", "--deterministic"])
    cfg, opts = distill_flags.resolve(args)
    assert cfg.addons["feature_labels"] == FeatureLabelConfig(lbd=0.1, feat_lbd=0.05, layer_idx=2, pooling="avg",
                                                    feat_metric="cos")
    assert opts.tta_mode == "hflip" and opts.deterministic
    cfg, opts = distill_flags.resolve(distill_flags.parse_args(["--method", "DATM", "--dataset", "MNIST", "--feature_labels"]))
    assert cfg.addons["feature_labels"].feat_lbd == 0.02  # DATM_ours' default
    cfg, opts = distill_flags.resolve(distill_flags.parse_args(["--method", "DC", "--dataset", "MNIST"]))
    assert "feature_labels" not in cfg.addons and opts.tta_mode == "" and not opts.deterministic
    with pytest.raises(utils.UserError, match="--feat_metric"):
        distill_flags.resolve(distill_flags.parse_args(["--dataset", "MNIST", "--feature_labels", "--feat_metric", "l1"]))


@pytest.mark.parametrize("name", ["MTT", "DATM"])
def test_trajectory_matching_learns_features_in_the_unroll(one_thread, buffer_root, name):
    extra = {"threshold": 100.0} if name == "DATM" else {}
    m, _ = build_mtt(name, buffer_root,
                     addons={"feature_labels": FeatureLabelConfig(lbd=0.1, feat_lbd=0.02, feat_init="random")},
                     **extra)
    syn = m.init_synthetic()
    features, images = syn.features.detach().clone(), syn.images.detach().clone()
    m.step(syn, 1)
    (addon,) = m.addons
    assert addon.optimizer in m.optimizers()
    assert float(m.unroll_extra) > 0 and not m.unroll_extra.requires_grad
    assert float(m.pop_addon_logs()["feat_ce"]) > 0
    assert not torch.equal(syn.features, features) and not torch.equal(syn.images, images)
