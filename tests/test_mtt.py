"""Trajectory matching (MTT, DATM, PAD) on a tiny buffer made by experts.make_buffer: the
loss, PAD's selection, one step of each method, soft labels, resume and evaluation of the saved set."""
import dataclasses
import math

import pytest
import torch

from cli import evaluate_flags

import evaluate
import methods
import utils
from sets import files
from methods.mtt import FlatModel, flatten, trajectory_matching_loss
from methods.runner import RunOptions, run_distillation
from tiny_data import build_mtt, tiny_record, image_loss_addon

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


def test_matching_loss_is_zero_at_the_target_and_one_at_the_start():
    start, target = torch.zeros(10), torch.arange(10.0)
    assert trajectory_matching_loss(target.clone(), start, target).item() == 0.0
    assert trajectory_matching_loss(start.clone(), start, target).item() == pytest.approx(1.0)


def test_pad_selection_keeps_the_stated_fraction():
    start, target = torch.zeros(10), torch.ones(10)
    student = torch.linspace(0.0, 0.9, 10)  # error (1 - s)^2 decreases along the vector
    error = (student - target) ** 2
    # loss_ratio 0.3: the 3 entries with the smallest error (the last three) are left out
    kept = torch.argsort(error)[3:]
    assert trajectory_matching_loss(student, start, target, loss_ratio=0.3).item() == pytest.approx(
        (error[kept].sum() / 7).item())
    # depth_ratio 0.4: the first 4 (shallowest) entries are left out of both sums
    assert trajectory_matching_loss(student, start, target, depth_ratio=0.4).item() == pytest.approx(
        (error[4:].sum() / 6).item())
    with pytest.raises(ValueError, match="loss_ratio"):
        trajectory_matching_loss(student, start, target, loss_ratio=1.0)


def test_student_reproducing_the_expert_has_zero_loss(buffer_root):
    m, _ = build_mtt("MTT", buffer_root)
    trajectory = m.experts.next()
    snapshot = trajectory[1]
    net = m.new_network()
    flat = flatten(snapshot)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for param, tensor in zip(net.parameters(), snapshot):
            param.copy_(tensor)
        assert torch.allclose(FlatModel(net)(flat, x), net(x), atol=1e-6)
    assert trajectory_matching_loss(flat, flatten(trajectory[0]), flat).item() == 0.0


@pytest.mark.parametrize("method", ["MTT", "DATM", "PAD"])
def test_one_step_changes_images_lr_and_labels(buffer_root, method):
    extra = {"threshold": 100.0} if method != "MTT" else {}
    if method == "DATM":
        extra["init"] = "real"
    if method == "PAD":
        extra["loss_ratio"] = 0.5
    m, _ = build_mtt(method, buffer_root, **extra)
    syn = m.init_synthetic()
    images, lr = syn.images.detach().clone(), float(syn.syn_lr.detach())
    logits = syn.label_logits.detach().clone() if syn.label_logits is not None else None
    logs = m.step(syn, 1)
    assert math.isfinite(float(logs["loss"])) and float(logs["loss"]) > 0
    assert not torch.equal(images, syn.images.detach())
    assert float(syn.syn_lr.detach()) != lr
    if method == "MTT":
        assert syn.label_logits is None and "skipped" not in logs
    else:
        assert logits.shape == (6, 3) and not torch.equal(logits, syn.label_logits.detach())
        assert float(logs["skipped"]) == 0.0
        assert torch.allclose(syn.targets().sum(1), torch.ones(6))


def test_datm_skips_updates_above_the_threshold(buffer_root):
    m, _ = build_mtt("DATM", buffer_root, threshold=1e-9)
    syn = m.init_synthetic()
    images = syn.images.detach().clone()
    logs = m.step(syn, 1)
    assert float(logs["skipped"]) == 1.0 and torch.equal(images, syn.images.detach())


def test_datm_initialises_with_correctly_classified_images_and_expert_logits(buffer_root):
    m, _ = build_mtt("DATM", buffer_root)
    syn = m.init_synthetic()
    judge = m.experts.first_file_experts()[0][-1]
    predictions = m.expert_logits(judge, syn.images.detach()).argmax(1)
    assert torch.equal(predictions, syn.labels)
    assert syn.label_logits.argmax(1).tolist() == syn.labels.tolist()


def test_datm_start_epoch_window_grows():
    from methods.datm import DATM, DATMOptions

    class Probe(DATM):
        def __init__(self):
            self.options = DATMOptions(min_start_epoch=0, current_max_start_epoch=2, max_start_epoch=6,
                                       expansion_end_epoch=100, Sequential_Generation=True)

    probe = Probe()
    assert [probe.upper_start_epoch(it) for it in (0, 25, 50, 100, 500)] == [2, 3, 4, 6, 6]
    probe.options = dataclasses.replace(probe.options, Sequential_Generation=False)
    assert probe.upper_start_epoch(0) == 6


def test_missing_or_short_buffer_is_a_clear_error(buffer_root, tmp_path):
    with pytest.raises(utils.UserError, match="buffer.py"):
        build_mtt("MTT", str(tmp_path))
    with pytest.raises(utils.UserError, match="max_start_epoch"):
        build_mtt("MTT", buffer_root, max_start_epoch=4, expert_epochs=2)


@pytest.mark.parametrize("method", ["MTT", "DATM"])
def test_run_saves_lr_and_soft_labels_that_evaluate_reads(buffer_root, tmp_path, method, monkeypatch):
    record = tiny_record()
    extra = dict(buffer_path=buffer_root, syn_steps=3, expert_epochs=1, max_start_epoch=3)
    if method == "DATM":
        extra.update(threshold=100.0, init="real")
    init = extra.pop("init", "real")
    cfg = methods.DistillConfig(method=method, dataset=record.name, model=MODEL, ipc=1, iterations=3, lr_img=100.0,
                                init=init, dsa_strategy="", extra=extra)
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=(MODEL,), epoch_eval_train=5, run_dir=str(tmp_path / "run"),
                      checkpoint_every=2)
    outcome = run_distillation(cfg, opts, record, CPU)
    blob = files.load_results(outcome.result_path)
    assert blob["meta"]["syn_lr"] and blob["meta"]["syn_lr"][0] != 0.01
    labels = blob["data"][0][1]
    assert labels.shape == ((3, 3) if method == "DATM" else (3,))
    # evaluate.py reads the learned lr and (soft) labels back
    monkeypatch.setattr("data.load_dataset", lambda *a, **k: record)
    args = evaluate_flags.build_parser().parse_args(["--syn_path", outcome.result_path, "--dataset", record.name])
    _, sets, _ = evaluate_flags.load_set(outcome.result_path, args, record)
    targets, learned_lr = sets[0].labels, sets[0].learned_lr
    assert learned_lr == pytest.approx(blob["meta"]["syn_lr"][0])
    if method == "DATM":
        assert torch.allclose(targets, torch.softmax(labels, 1))


def test_resume_equals_uninterrupted(buffer_root, tmp_path):
    record = tiny_record()
    extra = dict(buffer_path=buffer_root, syn_steps=2, expert_epochs=1, max_start_epoch=3, threshold=100.0)
    cfg = methods.DistillConfig(method="DATM", dataset=record.name, model=MODEL, ipc=1, iterations=4, lr_img=100.0,
                                init="real", dsa_strategy="", extra=extra)

    def run(name, stop_at=None):
        from methods.runner import RunInterrupted, StopFlag
        stop = StopFlag()
        opts = RunOptions(num_exp=1, num_eval=0, run_dir=str(tmp_path / name), resume=True, save_vis=False)

        def on_iteration(exp, iteration, logs):
            if iteration == stop_at:
                stop.requested = True
        try:
            return run_distillation(cfg, opts, record, CPU, stop=stop, on_iteration=on_iteration)
        except RunInterrupted:
            return None

    whole = files.load_results(run("whole").result_path)
    assert run("split", stop_at=2) is None
    resumed = files.load_results(run("split").result_path)
    assert torch.allclose(whole["data"][0][0], resumed["data"][0][0])
    assert torch.allclose(whole["data"][0][1], resumed["data"][0][1])
    assert whole["meta"]["syn_lr"] == pytest.approx(resumed["meta"]["syn_lr"])


def test_evaluate_reads_reference_logged_files(tmp_path):
    """images_*.pt / labels_*.pt (soft logits) / lr_*.pt as the MTT/DATM repositories log them."""
    record = tiny_record()
    images = torch.randn(6, 1, 8, 8)
    logits = torch.randn(6, 3)
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(logits, tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.02), tmp_path / "lr_best.pt")
    args = evaluate_flags.build_parser().parse_args(["--syn_path", str(tmp_path / "images_best.pt"), "--labels_path",
                                               str(tmp_path / "labels_best.pt"), "--lr_path", str(tmp_path / "lr_best.pt"),
                                               "--dataset", record.name])
    _, sets, _ = evaluate_flags.load_set(str(tmp_path / "images_best.pt"), args, record)
    loaded, targets, lr = sets[0].images, sets[0].labels, sets[0].learned_lr
    assert torch.equal(loaded, images) and torch.allclose(targets, torch.softmax(logits, 1)) and lr == pytest.approx(0.02)
    args = evaluate_flags.build_parser().parse_args(["--syn_path", str(tmp_path / "images_best.pt"), "--dataset", record.name])
    loaded = evaluate_flags.load_set(str(tmp_path / "images_best.pt"), args, record)[1][0]
    hard, lr = loaded.labels, loaded.learned_lr
    # without flags: class-major hard labels (a bare file's labels need --labels_path), the lr_best.pt beside it
    assert hard.tolist() == [0, 0, 1, 1, 2, 2] and lr == pytest.approx(0.02)
    (tmp_path / "lr_best.pt").unlink()
    assert evaluate_flags.load_set(str(tmp_path / "images_best.pt"), args, record)[1][0].learned_lr is None


def test_regularizers_join_the_trajectory_matching_update(buffer_root):
    m, _ = build_mtt("MTT", buffer_root)
    calls = []
    m.addons.append(image_loss_addon(lambda syn: calls.append(1) or 0.0 * syn.images.sum()))
    m.step(m.init_synthetic(), 1)
    assert calls == [1]
