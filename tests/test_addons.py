"""Every registered method on tiny generated data, and every method x add-on combination: it either
runs (and the add-on acts: its learned state changes, or its term joins the image update) or it is
refused with one line before anything is loaded."""
import json

import pytest
import torch

import methods
import networks
import utils
from cli import distill_flags
from methods import addons
from methods.addons import clom
from methods.addons.feature_labels import FeatureLabelConfig
from methods.runner import RunOptions, run_distillation
from sets import files
from tiny_data import CPU, MTT_MODEL, tiny_record, with_addons
from data import RealSampler

pytestmark = pytest.mark.usefixtures("one_thread")

TRAJECTORY = ("MTT", "DATM", "PAD")
# Per-method settings that keep two iterations tiny.
SMALL = {
    "CAFE": {"watcher_window": 2, "watcher_images": 2, "max_outer_steps": 2, "max_inner_steps": 1},
    "DATM": {"threshold": 100.0},
    "PAD": {"threshold": 100.0},
}


def config(name, buffer_root, **fields):
    """A tiny ``DistillConfig`` of method ``name`` (ConvNetW32, ipc 2, 2 iterations)."""
    cls = methods.get_method_class(name)
    values = {k: v for k, v in cls.defaults.items() if k != "eval_mode"}
    values.update(model=MTT_MODEL, ipc=2, iterations=2, batch_real=8, batch_train=8)
    if "init" in values and values["init"] == "noise":
        values["init"] = "real"
    extra = dict(SMALL.get(name, {}))
    if name in TRAJECTORY:
        values["lr_img"] = 100.0
        extra.update(buffer_path=buffer_root, syn_steps=2, expert_epochs=1, max_start_epoch=3)
    values.update(fields)
    return methods.DistillConfig(method=name, dataset="Tiny3", extra=extra, **values)


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_runs_two_iterations(name, buffer_root, pretrained, tmp_path, monkeypatch):
    record = tiny_record()
    cfg = config(name, buffer_root)
    if methods.get_method_class(name).needs_pretrained:  # NCFM: a pool of train_original.py models
        cfg = cfg.replace(extra={**cfg.extra, "num_premodel": 2, "pretrain_dir": pretrained, "num_freqs": 64})
    if methods.get_method_class(name).needs_teacher:  # SRe2L, CDA, RDED: a frozen BatchNorm teacher
        torch.manual_seed(0)
        teacher = networks.get_network("ConvNetBN", 1, 3, (8, 8)).eval().requires_grad_(False)
        monkeypatch.setattr(methods.DistillMethod, "load_teacher", lambda self: teacher)
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=(MTT_MODEL,), epoch_eval_train=2,
                      run_dir=str(tmp_path / name), save_vis=False)
    outcome = run_distillation(cfg, opts, record, CPU)
    blob = files.load_results(outcome.result_path)
    images, labels = blob["data"][0][:2]
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()
    assert len(outcome.accs_all_exps[MTT_MODEL]) == 1
    results = json.load(open(tmp_path / name / "results.json"))
    assert results["protocol"][MTT_MODEL]["epochs"] == 2
    assert blob["meta"]["protocol"]["epochs_augmented"] == 2


def clom_settings(pretrained):
    return clom.settings_from_flags(["10"], None, model=MTT_MODEL, model_num=2, pretrained_path=pretrained)


# Which methods host which add-on, from the hook points each declares (DistillMethod.addon_hooks
# against AddOn.requires): CLoM needs image-update terms; feature labels need networks trained with
# their term and F learned after image updates or inside an unroll.
HOSTS = {"CLoM": {"CAFE", "DATM", "DC", "DD", "DM", "DSA", "DataDAM", "FRePo", "KIP", "MTT", "PAD", "RaT-BPTT"},
         "feature_labels": {"DATM", "DC", "DM", "DSA", "DataDAM", "MTT", "PAD"}}


def test_hosting_follows_the_declared_hook_points():
    for addon, hosts in HOSTS.items():
        assert {name for name in methods.list_methods()
                if addon in addons.supported_by(methods.get_method_class(name))} == hosts


@pytest.mark.parametrize("addon", ["CLoM", "feature_labels"])
@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_and_addon_runs_or_is_refused(name, addon, buffer_root, pretrained):
    cls = methods.get_method_class(name)
    on = ({"CLoM": clom_settings(pretrained)} if addon == "CLoM"
          else {"feature_labels": FeatureLabelConfig(lbd=0.1, feat_init="random", feat_lbd=0.02)})
    cfg = config(name, buffer_root, addons=on)
    assert addons.enabled(cfg) == [addons.ADDONS[addon]]
    if name not in HOSTS[addon]:
        with pytest.raises(ValueError, match=f"{addons.ADDONS[addon].flag}: --method {name} does not support"):
            addons.check_hosted(cls, cfg)
        return
    record = tiny_record(per_class=16)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    torch.manual_seed(0)
    m = with_addons(cls(cfg, channel=1, num_classes=3, im_size=(8, 8), sampler=sampler, device=CPU,
                        generator=utils.make_generator(0)), record)
    assert [a.name for a in m.addons] == [addon]
    syn = m.init_synthetic()
    features = syn.extra("features").detach().clone() if syn.extra("features") is not None else None
    logs = {}
    for iteration in (1, 2):
        logs.update(m.step(syn, iteration))
        logs.update(m.pop_addon_logs())
    if addon == "CLoM":  # its term joined the image updates
        assert "clom" in logs and torch.isfinite(logs["clom"])
    else:  # the feature labels learned
        assert not torch.equal(syn.features, features)
        assert m.saved_entries(syn)[0].shape == syn.features.shape


@pytest.mark.parametrize("argv,message", [
    (["--method", "CAFE", "--feature_labels"], "--feature_labels: --method CAFE does not support the feature_labels"),
    (["--method", "herding", "--feature_labels"], "--method herding does not support the feature_labels"),
    (["--method", "random", "--alphas", "10"], "--alphas: --method random does not support the CLoM"),
    (["--method", "DC", "--dsa_strategy", "color_crop"], "--dsa_strategy color_crop: --method DC does not use"),
    (["--method", "DM", "--dis_metric", "mse"], "--dis_metric mse: --method DM does not use"),
    (["--method", "herding", "--Iteration", "5"], "--Iteration 5: --method herding does not use"),
])
def test_unsupported_combinations_are_refused_before_loading(argv, message):
    with pytest.raises(utils.UserError, match=message):
        distill_flags.resolve(distill_flags.parse_args(["--dataset", "MNIST", *argv]))


def test_dc_accepts_dsa_strategy_none_and_records_no_augmentation():
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--dataset", "MNIST", "--method", "DC",
                                                            "--dsa_strategy", "none"]))
    assert methods.get_method_class("DC").training_dsa(cfg) == ""
