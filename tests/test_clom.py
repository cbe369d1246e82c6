"""The CLoM add-on (methods/addons/clom.py, with its flags) on tiny generated data and tiny trained original models, CPU."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import distill
from cli import distill_flags
import methods
import utils
from sets import files
from data import RealSampler
from methods.addons import clom
from methods.runner import RunOptions, run_distillation
from tiny_data import tiny_record as _tiny_record

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


def tiny_record(**kw):
    """The shared miniature with 16 training images per class."""
    return _tiny_record(**{"per_class": 16, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


def settings(pretrained, alphas=("10",), models_pool=None, **kw):
    values = dict(model=MODEL, model_num=2, pretrained_path=pretrained)
    values.update(kw)
    return clom.settings_from_flags(list(alphas), models_pool, **values)


def build(method, record, clom_settings=None, **overrides):
    cls = methods.get_method_class(method)
    fields = {**cls.defaults, "ipc": 2, "batch_real": 8, "batch_train": 8, "iterations": 2, "init": "real",
              "model": MODEL, **overrides}
    fields.pop("eval_mode", None)
    cfg = methods.DistillConfig(method=method, dataset=record.name,
                                addons={"CLoM": clom_settings} if clom_settings else {}, **fields)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    return cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size, sampler=sampler,
               device=CPU, generator=utils.make_generator(0))


def with_clom(method, record, pretrained, overrides=None, **kw):
    s = settings(pretrained, **kw)
    m = build(method, record, s, **(overrides or {}))
    pool = clom.CLoM.load_shared(m.cfg.addons["CLoM"], m.cfg, record, CPU)
    addon = clom.CLoM(m.cfg.addons["CLoM"], m, pool)
    m.attach_addons([addon])
    return m, addon, pool


# ----- flags ------------------------------------------------------------------------------------
def test_alphas_one_for_all_or_one_per_architecture():
    assert clom.parse_alphas(["1000"], ["ConvNet", "LeNet", "AlexNet"]) == (1000.0, 1000.0, 1000.0)
    assert clom.parse_alphas(["1000", "2000"], ["ConvNet", "LeNet"]) == (1000.0, 2000.0)
    assert clom.parse_alphas(["1000,2000"], ["ConvNet", "LeNet"]) == (1000.0, 2000.0)
    with pytest.raises(utils.UserError, match="--alphas has 2 values but --models_pool has 3"):
        clom.parse_alphas(["1", "2"], ["ConvNet", "LeNet", "AlexNet"])
    with pytest.raises(utils.UserError, match="--alphas"):
        clom.parse_alphas(["ten"], ["ConvNet"])
    with pytest.raises(utils.UserError, match=">= 0"):
        clom.parse_alphas(["-1"], ["ConvNet"])


def test_distill_flags_reach_the_config():
    args = distill_flags.parse_args(["--method", "DC", "--dataset", "MNIST", "--alphas", "1000", "2000",
                               "--models_pool", "ConvNet,LeNet", "--model_num", "3", "--epoch", "20",
                               "--source_dataset", "FashionMNIST", "--pretrained_path", "pm"])
    cfg, _ = distill_flags.resolve(args)
    assert clom.CLoM.config_record(cfg.addons["CLoM"]) == {
        "alphas": [1000.0, 2000.0], "models_pool": ["ConvNet", "LeNet"], "model_num": 3, "distance": "ce",
        "source_dataset": "FashionMNIST", "epoch": 20, "batch_size": None, "pretrained_path": "pm"}
    plain, _ = distill_flags.resolve(distill_flags.parse_args(["--method", "DM", "--dataset", "MNIST"]))
    assert "CLoM" not in plain.addons
    # the reference spelling: space-separated pool, and a single weight for every architecture
    spaced = distill_flags.parse_args(["--dataset", "MNIST", "--alphas", "5", "--models_pool", "ConvNet", "LeNet"])
    assert clom.CLoM.from_flags(vars(spaced)).alphas == (5.0, 5.0)
    for argv, message in ((["--CLoM"], "--CLoM needs --alphas"),
                          (["--alphas", "1", "2"], "--alphas has 2 values"),
                          (["--alphas", "1", "--models_pool", "NoNet"], "--models_pool: unknown model"),
                          (["--alphas", "1", "--CLoM_distance", "cos"], "--CLoM_batch_size")):
        with pytest.raises(utils.UserError, match=message):
            # the flags as distill.py resolves them: --model left out is the method's network by then
            clom.CLoM.from_flags({**vars(distill_flags.parse_args(["--dataset", "MNIST", *argv])), "model": "ConvNet"})
    with pytest.raises(SystemExit):  # --model_num 0: refused while parsing (its declared range) ...
        distill_flags.parse_args(["--dataset", "MNIST", "--alphas", "1", "--model_num", "0"])
    with pytest.raises(utils.UserError, match="--model_num"):  # ... and by the add-on for values from elsewhere
        clom.CLoM.from_flags({**vars(distill_flags.parse_args(["--dataset", "MNIST", "--alphas", "1"])),
                              "model": "ConvNet", "model_num": 0})


# ----- loading ----------------------------------------------------------------------------------
def test_models_are_loaded_frozen_and_in_eval_mode(pretrained):
    record = tiny_record()
    m, regularizer, pool = with_clom("DM", record, pretrained)
    assert list(pool) == [MODEL] and len(pool[MODEL]) == 2
    for net in pool[MODEL]:
        assert not net.training
        assert all(not p.requires_grad for p in net.parameters())
    syn = m.init_synthetic()
    regularizer.image_loss(syn).backward()
    assert syn.images.grad is not None and syn.images.grad.abs().sum() > 0
    assert all(p.grad is None for net in pool[MODEL] for p in net.parameters())


def test_missing_models_name_directory_and_command(tmp_path):
    record = tiny_record()
    m = build("DC", record, settings(str(tmp_path / "nowhere"), model_num=1))
    with pytest.raises(utils.UserError) as error:
        clom.CLoM.load_shared(m.cfg.addons["CLoM"], m.cfg, record, CPU)
    message = str(error.value)
    assert os.path.join(str(tmp_path / "nowhere"), "Tiny3", "original", MODEL) in message
    assert "python train_original.py --dataset Tiny3 --model ConvNetW32" in message


def test_too_many_models_asked(pretrained):
    record = tiny_record()
    m = build("DC", record, settings(pretrained, model_num=3))
    with pytest.raises(utils.UserError, match="index_2"):
        clom.CLoM.load_shared(m.cfg.addons["CLoM"], m.cfg, record, CPU)


def test_epoch_maps_to_the_trained_epochs(pretrained):
    record = tiny_record()
    ok = build("DC", record, settings(pretrained, epoch=2))
    assert len(clom.CLoM.load_shared(ok.cfg.addons["CLoM"], ok.cfg, record, CPU)[MODEL]) == 2
    wrong = build("DC", record, settings(pretrained, epoch=150))
    with pytest.raises(utils.UserError, match="--epoch 150: .* holds 2 trained epochs"):
        clom.CLoM.load_shared(wrong.cfg.addons["CLoM"], wrong.cfg, record, CPU)


def test_ce_needs_the_same_classes_and_shape(pretrained):
    other = tiny_record(num_classes=2, name="Tiny3")
    m = build("DC", other, settings(pretrained))
    with pytest.raises(utils.UserError, match="num_classes"):
        clom.CLoM.load_shared(m.cfg.addons["CLoM"], m.cfg, other, CPU)


# ----- the term ---------------------------------------------------------------------------------
def test_ce_term_equals_alpha_times_cross_entropy(pretrained):
    record = tiny_record()
    m, regularizer, pool = with_clom("DC", record, pretrained, alphas=("7.5",), model_num=1)
    syn = m.init_synthetic()
    net = pool[MODEL][0]
    with torch.no_grad():
        logits = net(syn.images)
    # hand: -log softmax at the label, averaged over the 6 synthetic images
    log_probs = logits - logits.exp().sum(1, keepdim=True).log()
    expected = 7.5 * -log_probs[torch.arange(6), syn.labels].mean()
    assert regularizer.image_loss(syn).item() == pytest.approx(expected.item(), rel=1e-5)
    assert regularizer.pop_logs()["clom"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert regularizer.pop_logs() == {}


def test_cos_term_hand_computed():
    feat_syn = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    feat_real = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cosine distances: row 0: [0, 1, 1 - 1/sqrt2]; row 1: [1, 0, 1 - 1/sqrt2]
    # same class (syn 0 ~ real 0; syn 1 ~ real 1, real 2): 0 + 0 + (1 - 1/sqrt2)
    total = 2 + 2 * (1 - 1 / math.sqrt(2))
    expected = 2.0 * (1 - 1 / math.sqrt(2)) / total
    value = clom.clom_cos(feat_syn, torch.tensor([0, 1]), feat_real, torch.tensor([0, 1, 1]), 2, alpha=2.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_cos_variant_runs_and_draws_real_batches(pretrained):
    record = tiny_record()
    m, regularizer, _ = with_clom("DM", record, pretrained, distance="cos", batch_size=5)
    syn = m.init_synthetic()
    value = regularizer.image_loss(syn)
    assert 0 < value.item() < 10  # alpha 10, the ratio is in (0, 1)
    value.backward()
    assert syn.images.grad.abs().sum() > 0


def test_draws_cover_the_pool_and_follow_the_generator(pretrained):
    record = tiny_record()
    m, regularizer, pool = with_clom("DC", record, pretrained)
    ids = {id(net): i for i, net in enumerate(pool[MODEL])}
    first = [ids[id(regularizer.draw()[2])] for _ in range(30)]
    assert set(first) == {0, 1}
    m2, regularizer2, pool2 = with_clom("DC", record, pretrained)
    ids2 = {id(net): i for i, net in enumerate(pool2[MODEL])}
    assert [ids2[id(regularizer2.draw()[2])] for _ in range(30)] == first
    # the method's own generator does not move (alpha 0 reproduces the plain run)
    assert torch.equal(m.generator.get_state(), utils.make_generator(0).get_state())


# ----- the hook in DC / DM ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["DC", "DSA", "DM"])
def test_clom_changes_the_update_and_alpha_zero_does_not(method, pretrained):
    record = tiny_record()

    def one_step(alphas):
        if alphas is None:
            m = build(method, record)
        else:
            m, _, _ = with_clom(method, record, pretrained, alphas=alphas)
        torch.manual_seed(3)
        syn = m.init_synthetic()
        logs = m.step(syn, 1)
        return syn.images.detach().clone(), logs

    plain, _ = one_step(None)
    zero, _ = one_step(("0",))
    strong, _ = one_step(("1000",))
    assert torch.equal(zero, plain)
    assert not torch.allclose(strong, plain)


def test_clom_lowers_the_original_models_loss(pretrained):
    """A few DM updates with a large alpha make the original models classify the set better than
    the same updates without CLoM."""
    record = tiny_record()
    plain = build("DM", record, init="noise", dsa_strategy="none")
    regularized, _, pool = with_clom("DM", record, pretrained, dict(init="noise", dsa_strategy="none"),
                                        alphas=("20",))

    def loss_after(m):
        torch.manual_seed(4)
        syn = m.init_synthetic()
        for iteration in range(1, 6):
            m.step(syn, iteration)
        with torch.no_grad():
            return sum(F.cross_entropy(net(syn.images), syn.labels).item() for net in pool[MODEL])

    assert loss_after(regularized) < loss_after(plain)


def test_run_logs_records_and_resumes_with_clom(pretrained, tmp_path):
    record = tiny_record()
    s = settings(pretrained, alphas=("50",))
    cfg = methods.DistillConfig(method="DM", dataset="Tiny3", model=MODEL, ipc=1, iterations=4, lr_img=1.0,
                                batch_real=8, batch_train=8, init="real", dsa_strategy="", addons={"CLoM": s})

    def opts(name, **kw):
        return RunOptions(num_exp=1, num_eval=0, eval_it=0, eval_models=(MODEL,), run_dir=str(tmp_path / name),
                          save_vis=False, **kw)

    seen = []
    whole = run_distillation(cfg, opts("whole"), record, CPU, on_iteration=lambda e, i, logs: seen.append(logs))
    assert all("clom" in logs and 0 < float(logs["clom"]) for logs in seen)
    import json
    import yaml

    assert json.load(open(os.path.join(whole.run_dir, "results.json")))["clom"]["alphas"] == [50.0]
    assert yaml.safe_load(open(os.path.join(whole.run_dir, "config.yaml")))["distill"]["clom"]["model_num"] == 2
    # stop after 2 iterations (checkpoint), resume: the same images as the uninterrupted run
    from methods.runner import RunInterrupted, StopFlag

    stop = StopFlag()

    def request_stop(exp, iteration, logs):
        if iteration == 2:
            stop.requested = True

    with pytest.raises(RunInterrupted):
        run_distillation(cfg, opts("split", checkpoint_every=0), record, CPU, stop=stop, on_iteration=request_stop)
    resumed = run_distillation(cfg, opts("split", resume=True), record, CPU)
    a = files.load_results(whole.result_path)["data"][0][0]
    b = files.load_results(resumed.result_path)["data"][0][0]
    assert torch.equal(a, b)
