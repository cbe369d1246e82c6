"""DD (Wang et al. 2018) on generated miniatures: the meta-loss learns images and step sizes, its
gradient matches finite differences, RaT-BPTT truncates the backward pass, known_init keeps its
initialisations, the schedule is saved and evaluated, and flag mistakes are one line."""
import json
import os

import pytest
import torch

import methods
import networks
import evaluation
import utils
from cli import evaluate_flags
from methods.runner import RunOptions, run_distillation, schedule_key
from sets import comparison, files
from sets.resources import SavedTensorMeter
from tiny_data import CPU, build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks; a second thread only costs here


def _dd(record, **overrides):
    """DD on ``record`` with the whole training set as the real batch (a fixed meta-loss up to order)."""
    fields = dict(ipc=2, batch_real=len(record.labels_train), lr_img=0.05, init="real")
    fields.update(overrides)
    return build_method("DD", record, **fields)


def test_meta_loss_lowers_and_moves_images_and_step_sizes():
    record = tiny_record(per_class=8)
    method = _dd(record, train_nets_type="known_init")
    syn = method.init_synthetic()
    images, raw = syn.images.detach().clone(), syn.step_lr_raw.detach().clone()
    assert raw.shape == (2 * 3,)  # distill_steps (ipc 2 / 1 per step) x distill_epochs 3
    losses = [float(method.step(syn, it)["loss"]) for it in range(1, 9)]
    assert all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(syn.images.detach(), images)
    assert not torch.equal(syn.step_lr_raw.detach(), raw)


def test_known_init_reuses_its_initialisations_and_unknown_init_draws_new_ones():
    record = tiny_record(per_class=4)
    known = _dd(record, train_nets_type="known_init", n_nets=2)
    first, second = known.initialisations(), known.initialisations()
    assert len(first) == 2 and not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    restored = _dd(record, train_nets_type="known_init", n_nets=2)
    restored.load_state_dict({**known.state_dict(), "optimizer_img": None})
    assert torch.equal(restored.known_inits, known.known_inits)
    fresh = _dd(record)
    assert not torch.equal(fresh.initialisations()[0], fresh.initialisations()[0])


def test_meta_gradient_equals_central_finite_differences_on_two_steps():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        record = tiny_record(num_classes=2, per_class=4, size=6)
        record.images_train, record.images_test = record.images_train.double(), record.images_test.double()
        method = _dd(record, model="ConvNetW32", distill_epochs=1, train_nets_type="known_init", distill_lr=0.1)
        syn = method.init_synthetic()
        assert method.total_steps == 2
        loss = method.loss(syn)
        grad_images, grad_raw = torch.autograd.grad(loss, [syn.images, syn.step_lr_raw])
        eps = 1e-6

        def central(tensor, index):
            tensor.data[index] += eps
            up = float(method.loss(syn).detach())
            tensor.data[index] -= 2 * eps
            down = float(method.loss(syn).detach())
            tensor.data[index] += eps
            return (up - down) / (2 * eps)

        for index in [(0, 0, 1, 2), (3, 0, 4, 4), (2, 0, 0, 5)]:
            assert central(syn.images, index) == pytest.approx(float(grad_images[index]), rel=1e-4, abs=1e-9)
        for index in [(0,), (1,)]:
            assert abs(float(grad_raw[index])) > 1e-6
            assert central(syn.step_lr_raw, index) == pytest.approx(float(grad_raw[index]), rel=1e-4, abs=1e-9)
    finally:
        torch.set_default_dtype(previous)


def test_rat_bptt_backpropagates_only_through_the_window_and_saves_less():
    record = tiny_record(per_class=2)
    method = _dd(record, distill_epochs=2, rat_bptt=True, truncation=2)  # T = 4 steps, window 2
    syn = method.init_synthetic()
    seen = set()
    for _ in range(5):
        loss = method.loss(syn)
        steps = method.last_unroll
        seen.add(steps)
        assert 2 <= steps <= 4
        grad = torch.autograd.grad(loss, syn.step_lr_raw)[0]
        inside = list(range(steps - 2, steps))
        assert all(grad[t] != 0 for t in inside), (steps, grad)
        assert all(grad[t] == 0 for t in range(4) if t not in inside), (steps, grad)
    assert len(seen) > 1  # the unroll length is drawn
    start = method.initialisations()[0]
    peaks = {}
    for window in (4, 1):
        with SavedTensorMeter() as meter:
            final = method.unroll(syn, start, steps=4, window=window)
            torch.nn.functional.cross_entropy(method.student(final, syn.images.detach()), syn.labels).backward()
        peaks[window] = meter.peak_bytes
    assert 0 < peaks[1] < peaks[4] / 2, peaks


def test_schedule_is_saved_recorded_and_read_back(tmp_path):
    record = tiny_record(per_class=4)
    cfg = methods.DistillConfig(method="DD", dataset=record.name, model="ConvNetW32", ipc=2, iterations=2,
                                lr_img=0.01, batch_real=12, init="real", extra={"distill_epochs": 2})
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=("ConvNetW32",), epoch_eval_train=2,
                      run_dir=str(tmp_path / "run"), save_vis=False)
    outcome = run_distillation(cfg, opts, record, CPU)
    assert set(outcome.accs_all_exps) == {"ConvNetW32", schedule_key("ConvNetW32")}
    with open(os.path.join(opts.run_dir, "results.json")) as handle:
        results = json.load(handle)
    assert results["eval_protocols"] == ["shared", "schedule"]
    assert results["protocol"][schedule_key("ConvNetW32")]["steps"] == 4
    blob = files.load_results(outcome.result_path)
    saved = blob["meta"]["step_schedule"][0]
    assert len(saved["lrs"]) == 4 and saved["batches"][0] == saved["batches"][2] == [0, 2, 4]
    _, (experiment,) = evaluate_flags.read_experiments(outcome.result_path, record)
    assert experiment.schedule is not None and experiment.schedule.lrs == tuple(saved["lrs"])
    test_x, test_y = record.images_test, record.labels_test
    row = comparison.Row(name="DD", kind="schedule", ipc=2, method="DD", dataset=record.name)
    comparison.evaluate_schedule_row(row, [experiment], ["ConvNetW32"], test_x, test_y, record.num_classes,
                                     num_eval=1, device=CPU, seed=0)
    assert row.results["ConvNetW32"]["accs"] == results["accuracy"][schedule_key("ConvNetW32")]["accs"]


def test_schedule_training_follows_the_steps():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    net = networks.get_network("ConvNetW32", 1, 2, (8, 8), device=CPU)
    before = [p.detach().clone() for p in net.parameters()]
    evaluation.train_on_schedule(net, images, labels, evaluation.StepSchedule(lrs=(0.0,), batches=((0, 1),)))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    evaluation.train_on_schedule(net, images, labels, evaluation.StepSchedule(lrs=(0.1,), batches=((0, 1),)))
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="outside 0..3"):
        evaluation.StepSchedule(lrs=(0.1,), batches=((4,),)).check(4)


@pytest.mark.parametrize("argv,needle", [
    (["--ipc", "1", "--distill_steps", "10"], "--ipc 1 but --distill_steps 10"),
    (["--truncation", "5"], "--truncation 5 applies only with --rat_bptt"),
    (["--rat_bptt", "--truncation", "99"], "--truncation 99 exceeds the 30 unrolled steps"),
    (["--train_nets_type", "loaded"], "--train_nets_type 'loaded': expected one of unknown_init, known_init"),
    (["--dsa_strategy", "color"], "--dsa_strategy color: --method DD does not use this flag"),
])
def test_bad_dd_flags_are_one_line_before_any_data(argv, needle, capsys, monkeypatch, tmp_path):
    import cli
    import distill

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")

    monkeypatch.setattr(cli, "load_record", no_data)
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "DD", "--dataset", "FashionMNIST", "--run_dir", str(tmp_path / "r"), *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1 and needle in err[0], err
