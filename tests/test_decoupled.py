"""The decoupled family (methods/sre2l.py, methods/rded.py): the BatchNorm statistics loss against a
hand computation from a teacher's running statistics, CDA's curriculum, one SRe2L step (Adam at
the cosine rate, pixels clipped, the first step's BN loss recorded), RDED keeping the lowest-CE
patches on a crafted teacher and stitching them in order, a missing teacher refused in one line,
and every new method resuming bit-exactly."""
import json
import math

import pytest
import torch
import torch.nn as nn

import methods
import utils
from cli import distill_flags
from methods.base import DistillMethod
from methods.rded import auto_factor, select_patches, stitch
from methods.run_config import RunInterrupted, RunOptions, StopFlag
from methods.runner import run_distillation
from methods.sre2l import BNStatistics, bn_feature_distance, cosine_lr, curriculum_min_scale
from sets import files
from tiny_data import CPU, build_method, tiny_record

import networks


def frozen(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def bn_teacher(record, seed=0) -> nn.Module:
    """A ConvNetBN on the record's shape whose running statistics saw its training images."""
    torch.manual_seed(seed)
    net = networks.get_network("ConvNetBN", record.channel, record.num_classes, record.im_size, device=CPU)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(record.images_train)
    return frozen(net)


@pytest.fixture
def teacher_for_runs(monkeypatch):
    """Every method loads the same frozen BN teacher of ``tiny_record()``."""
    teacher = bn_teacher(tiny_record())
    monkeypatch.setattr(DistillMethod, "load_teacher", lambda self: teacher)
    return teacher


# ---- the BatchNorm statistics loss ----------------------------------------------------------
class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).mean(dim=(2, 3))


def hand_distance(f, mean, var):
    """sqrt(sum_c (var_c - v_c)^2) + sqrt(sum_c (mean_c - m_c)^2), the statistics by explicit sums."""
    n = f.shape[0] * f.shape[2] * f.shape[3]
    m = [float(f[:, c].sum()) / n for c in range(f.shape[1])]
    v = [float(((f[:, c] - m[c]) ** 2).sum()) / n for c in range(f.shape[1])]
    return (math.sqrt(sum((float(var[c]) - v[c]) ** 2 for c in range(len(v))))
            + math.sqrt(sum((float(mean[c]) - m[c]) ** 2 for c in range(len(m)))))


def test_bn_loss_equals_a_hand_computation_from_running_statistics():
    torch.manual_seed(3)
    net = TwoBN()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net = frozen(net)
    x = torch.randn(5, 1, 6, 6, requires_grad=True)
    with BNStatistics([net], first_multiplier=10.0) as hooks:
        net(x)
        loss = hooks.loss()
    with torch.no_grad():
        f1 = net.conv1(x)
        f2 = net.conv2(torch.relu(net.bn1(f1)))
    expected = (10 * hand_distance(f1, net.bn1.running_mean, net.bn1.running_var)
                + hand_distance(f2, net.bn2.running_mean, net.bn2.running_var))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(bn_feature_distance(f1, net.bn1.running_mean, net.bn1.running_var)) == pytest.approx(
        hand_distance(f1, net.bn1.running_mean, net.bn1.running_var), rel=1e-5)
    loss.backward()  # the loss reaches the images
    assert x.grad is not None and x.grad.abs().sum() > 0
    # outside ``with`` the hooks are gone: the teacher's other forward passes record nothing
    net(x)
    assert hooks.distances == {} and not net.bn1._forward_hooks


def test_a_teacher_without_batchnorm_is_refused_in_one_line():
    plain = frozen(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(utils.UserError, match="no BatchNorm2d layer") as error:
        BNStatistics([plain], 10.0)
    assert "\n" not in str(error.value)


def test_cda_curriculum_and_the_cosine_rate():
    assert curriculum_min_scale(0, 100, "cosine", 1.0) == pytest.approx(1.0)
    assert curriculum_min_scale(50, 100, "cosine", 1.0) == pytest.approx(0.08 + 0.92 * 0.5)
    assert curriculum_min_scale(25, 100, "linear", 0.5) == pytest.approx(0.08 + 0.92 * 0.5)
    assert curriculum_min_scale(49, 100, "step", 0.5) == 1.0 and curriculum_min_scale(50, 100, "step", 0.5) == 0.08
    assert curriculum_min_scale(0, 100, "cosine", 0.0) == 0.08  # milestone 0: SRe2L
    assert cosine_lr(0.25, 0, 10) == 0.25 and cosine_lr(0.25, 5, 10) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="--easy2hard_mode"):
        curriculum_min_scale(0, 10, "exp", 1.0)


def test_one_sre2l_step(teacher_for_runs):
    record = tiny_record()
    method = build_method("SRe2L", record, jitter=2, iterations=4)
    syn = method.init_synthetic()
    assert syn.images.shape == (6, 1, 8, 8)
    assert [b.tolist() for b in method.batches(syn)] == [[0, 2, 4], [1, 3, 5]]  # one image per class
    before = syn.images.detach().clone()
    logs = method.step(syn, 1)
    assert all(torch.isfinite(v) for v in logs.values()) and not torch.equal(before, syn.images)
    low, high = method.pixel_range
    assert (syn.images >= low).all() and (syn.images <= high).all()
    assert method.optimizer_img.param_groups[0]["lr"] == 0.25  # step 1: the full rate
    assert method.optimizer_img.param_groups[0]["betas"] == (0.5, 0.9)
    report = method.bn_report
    assert report["bn_loss_first_step"] == pytest.approx(float(logs["loss_bn"])) and report["bn_layers"] == 3
    assert report["weighted_bn_first_step"] == pytest.approx(0.01 * report["bn_loss_first_step"])
    method.step(syn, 2)
    assert method.optimizer_img.param_groups[0]["lr"] == pytest.approx(cosine_lr(0.25, 1, 4))
    assert method.bn_report == report  # the first step's, kept


# ---- RDED -----------------------------------------------------------------------------------
class BrightnessTeacher(nn.Module):
    """Class 0's logit is the mean pixel: the brighter the patch, the lower its CE on class 0."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3)
        logits[:, 0] = x.mean(dim=(1, 2, 3))
        return logits


def constant_record(values):
    """Class 0's training images are constant images of ``values``; classes 1 and 2 noise."""
    record = tiny_record()
    n = record.images_train.shape[0] // 3
    assert len(values) == n
    record.images_train[:n] = torch.tensor(values).view(-1, 1, 1, 1).expand(n, 1, 8, 8)
    return record


def test_rded_keeps_the_lowest_ce_patches_and_stitches_them_in_order():
    values = [0.1 * i for i in range(24)]
    values[5], values[17] = 9.0, 7.0  # the two brightest candidates
    record = constant_record(values)
    # factor 1: each image is the lowest-CE (brightest) candidate, in increasing CE
    method = build_method("RDED", record, mipc=24, num_crop=3, factor=1)
    method.teacher = BrightnessTeacher()
    syn = method.init_synthetic()
    assert torch.allclose(syn.images[0], torch.full((1, 8, 8), 9.0))
    assert torch.allclose(syn.images[1], torch.full((1, 8, 8), 7.0))
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2] and not syn.images.requires_grad
    # factor 2, ipc 1: the 4 lowest-CE patches fill the cells row-major in increasing CE
    values[8] = 5.0
    record = constant_record(values)
    method = build_method("RDED", record, ipc=1, mipc=24, num_crop=2, factor=2)
    method.teacher = BrightnessTeacher()
    image = method.init_synthetic().images[0, 0]
    for cell, value in (((slice(0, 4), slice(0, 4)), 9.0), ((slice(0, 4), slice(4, 8)), 7.0),
                        ((slice(4, 8), slice(0, 4)), 5.0), ((slice(4, 8), slice(4, 8)), 2.3)):
        assert torch.allclose(image[cell], torch.full((4, 4), value), atol=1e-5), (cell, image[cell])


def test_rded_selector_and_stitching_pieces():
    scores = torch.tensor([[3.0, 1.0], [0.5, 4.0], [2.0, 2.5]])
    images, crops = select_patches(scores, 2)
    assert images.tolist() == [1, 0] and crops.tolist() == [0, 1]
    patches = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    out = stitch(patches, 2, 2, (5, 5))  # cells 3+2 pixels: the first row / column one larger
    assert out.shape == (2, 1, 5, 5)
    assert out[0, 0, 0, 0] == 0 and out[1, 0, 0, 0] == 1 and out[0, 0, 0, 4] == 2 and out[0, 0, 4, 0] == 4
    assert out[1, 0, 4, 4] == 7 and out[0, 0, 2, 2] == 0 and out[0, 0, 3, 3] == 6
    assert auto_factor((28, 28)) == 1 and auto_factor((128, 128)) == 2 and auto_factor((224, 224)) == 2


def test_rded_refuses_too_few_candidates_in_one_line():
    method = build_method("RDED", tiny_record(), ipc=2, mipc=3, factor=2)
    method.teacher = BrightnessTeacher()
    with pytest.raises(utils.UserError, match="--mipc 3: class 0 gives 3 candidates, but --ipc 2 with --factor 2 "
                                              "needs 8"):
        method.init_synthetic()


# ---- no teacher -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["SRe2L", "CDA", "RDED"])
def test_no_teacher_is_one_clear_line(name, monkeypatch, capsys):
    import data
    import distill

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the teacher was checked")

    monkeypatch.setattr(data, "load_dataset", no_loading)
    with pytest.raises(SystemExit) as stopped:
        distill.main(["--method", name, "--dataset", "FashionMNIST", "--run_dir", "unused", "--device", "cpu"])
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"--method {name} needs a teacher: give --teacher_model" in err
    method = build_method(name, tiny_record())
    with pytest.raises(utils.UserError, match="needs a teacher"):
        method.init_synthetic()


def test_cda_milestone_above_one_is_refused():
    # the reference asserts 0 <= milestone <= 1: the option's declared range
    with pytest.raises(ValueError, match=r"--milestone must be in \[0, 1\], got 1.5"):
        methods.get_method_class("CDA").resolve_options({"milestone": 1.5})


# ---- resume ---------------------------------------------------------------------------------
def decoupled_config(name, **extra):
    fields = dict(ipc=2, iterations=6, lr_img=0.25, init="noise") if name != "RDED" else dict(ipc=2, iterations=0,
                                                                                              init="real")
    extra = {"jitter": 2, **extra} if name != "RDED" else {"mipc": 12, "num_crop": 2, **extra}
    return methods.DistillConfig(method=name, dataset="Tiny3", model="ConvNetW32", dsa_strategy="", extra=extra,
                                 **fields)


@pytest.mark.parametrize("name", ["SRe2L", "CDA", "RDED"])
def test_every_new_method_resumes_bit_exactly(name, teacher_for_runs, tmp_path, one_thread):
    record = tiny_record()
    cfg = decoupled_config(name)
    num_exp = 2 if name == "RDED" else 1

    def opts(run, **kw):
        return RunOptions(num_exp=num_exp, num_eval=0, run_dir=str(tmp_path / run), checkpoint_every=0,
                          save_vis=False, **kw)

    full = run_distillation(cfg, opts("full"), record, CPU)
    stop = StopFlag()
    if name == "RDED":  # a selection: stopped after the first experiment
        stop.requested = True

    def interrupt(exp, iteration, logs):
        stop.requested = stop.requested or iteration == 3

    with pytest.raises(RunInterrupted):
        run_distillation(cfg, opts("cut"), record, CPU, stop=stop, on_iteration=interrupt)
    resumed = run_distillation(cfg, opts("cut", resume=True), record, CPU)
    a, b = (files.load_results(outcome.result_path)["data"] for outcome in (full, resumed))
    assert len(a) == len(b) == num_exp
    for entry_a, entry_b in zip(a, b):
        assert torch.equal(entry_a[0], entry_b[0]) and torch.equal(entry_a[1], entry_b[1])
    # the teacher is recorded with the set and in results.json; SRe2L/CDA also the BN-loss report
    assert files.load_results(full.result_path)["meta"]["teacher"] == {"spec": {}}  # a test teacher: no spec
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["teacher"] == {"spec": {}}
    if name != "RDED":
        assert results["bn_report"]["bn_loss_first_step"] > 0 and results["bn_report"]["bn_layers"] == 3


# ---- end to end through distill.py with a train_original.py teacher ---------------------------
@pytest.fixture(scope="module")
def bn_teacher_root(tmp_path_factory):
    """A ConvNetBN trained 2 epochs on ``tiny_record()`` (named Tiny3), in train_original.py's layout."""
    from pretrained import originals

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bn_teacher")
    cfg = originals.OriginalConfig(dataset="Tiny3", model="ConvNetBN", epochs=2, batch_size=16, lr_decay_step=(5,))
    originals.train_originals(cfg, tiny_record(), str(root), 1, device=CPU, save_every=0)
    torch.set_num_threads(before)
    return str(root)


@pytest.mark.parametrize("name,extra,labels", [("SRe2L", ["--Iteration", "3", "--jitter", "2"], "soft"),
                                               ("RDED", ["--mipc", "8", "--num_crop", "2"], "teacher")])
def test_distill_with_a_teacher_records_it_and_evaluates_under_its_labels(name, extra, labels, bn_teacher_root,
                                                                          fake_dataset, tmp_path, one_thread):
    import distill

    run_dir = tmp_path / name
    code = distill.main(["--method", name, "--dataset", "Tiny3", "--model", "ConvNetW32", "--ipc", "1", *extra,
                         "--num_eval", "1", "--epoch_eval_train", "2", "--teacher_model", "ConvNetBN",
                         "--teacher_dir", bn_teacher_root, "--run_dir", str(run_dir), "--device", "cpu", "--no-vis",
                         "--threads", "1"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    protocol = results["protocol"]["ConvNetW32"]
    assert protocol["label_regime"] == labels and protocol["optimizer"] == "AdamW" and protocol["labels"] == "hard"
    network = results["teacher"]["networks"][0]
    assert network["arch"] == "ConvNetBN" and len(network["sha256"]) == 64
    meta = files.load_results(str(run_dir / f"res_{name}_Tiny3_ConvNetW32_1ipc.pt"))["meta"]
    assert meta["teacher"]["spec"]["models"] == ["ConvNetBN"] and meta["protocol"]["labels"] == labels
    assert meta["protocol"]["optimizer"] == "adamw" and meta["protocol"]["mix_type"] == "cutmix"
    if name == "SRe2L":  # the relabelled soft labels' size and the BN-loss report
        assert results["soft_labels"]["ConvNetW32"]["mb_per_epoch"] > 0
        assert results["bn_report"]["bn_layers"] == 3 and results["bn_report"]["bn_loss_first_step"] > 0


def test_teacher_labels_without_a_teacher_are_one_line(fake_dataset, capsys):
    import distill

    with pytest.raises(SystemExit) as stopped:
        distill.main(["--method", "DM", "--dataset", "Tiny3", "--labels", "teacher", "--device", "cpu"])
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--labels teacher needs a teacher: give --teacher_model" in err
