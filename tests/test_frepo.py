"""FRePo: the ridge solve, the loss and LAMB update of images and labels, the model pool's resets,
the squared-error evaluation of real-valued labels, and one-line mistakes (tiny generated data)."""
import json
import os

import pytest
import torch

import distill
import methods
import networks
import evaluation
import utils
from cli import distill_flags, evaluate_flags
from methods import frepo as frepo_module
from methods.runner import RunInterrupted, RunOptions, StopFlag, run_distillation
from methods.frepo import initial_label_values, label_margin_loss, regression_mse
from methods.kernels import kernel_ridge_regression
from evaluation import centred_one_hot
from sets import files
from tiny_data import build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only costs on 2 busy cores


def build_frepo(**overrides):
    record = tiny_record()
    settings = dict(batch_real=32, lr_img=0.01, num_nn_state=2, max_online_updates=3)
    settings.update(overrides)
    return build_method("FRePo", record, **settings), record


def test_ridge_regression_matches_the_explicit_formula():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(4, 7, generator=g, dtype=torch.float64)
    target = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    k_ss, k_ts = support @ support.T, target @ support.T
    expected = k_ts @ torch.inverse(k_ss + 0.3 * torch.trace(k_ss) / 4 * torch.eye(4, dtype=torch.float64)) @ y
    assert torch.allclose(kernel_ridge_regression(k_ts, k_ss, y, 0.3), expected, atol=1e-10)


def test_label_pieces_follow_the_reference():
    targets = centred_one_hot(torch.tensor([0, 2]), 4)
    assert torch.allclose(targets, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.25, -0.25, 0.75, -0.25]]))
    assert torch.allclose(initial_label_values(torch.tensor([1]), 40), centred_one_hot(torch.tensor([1]), 40) / 2.0)
    assert regression_mse(targets, targets).item() == 0.0
    assert regression_mse(targets, targets + 1.0).item() == pytest.approx(0.5 * 4)
    # margin clipped at 1/K: a confident label gives -1/K, a tie gives 0
    assert label_margin_loss(torch.tensor([[2.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(-0.25)


def test_a_few_iterations_lower_the_loss_and_change_images_and_labels():
    method, _ = build_frepo(num_nn_state=1, max_online_updates=100, lr_img=0.01)
    syn = method.init_synthetic()
    images, labels = syn.images.detach().clone(), syn.label_values.detach().clone()
    torch.manual_seed(0)
    before = [method.loss(syn).item() for _ in range(3)]
    for iteration in range(1, 9):
        logs = method.step(syn, iteration)
        assert torch.isfinite(logs["loss"])
    torch.manual_seed(0)
    after = [method.loss(syn).item() for _ in range(3)]
    assert sum(after) < sum(before)
    assert not torch.allclose(syn.images, images) and not torch.allclose(syn.label_values, labels)
    assert torch.equal(syn.export_labels(), syn.label_values.detach())


def test_fixed_labels_stay_fixed():
    method, _ = build_frepo(learn_label=False)
    syn = method.init_synthetic()
    labels = syn.label_values.detach().clone()
    for iteration in range(1, 3):
        method.step(syn, iteration)
    assert torch.equal(syn.label_values, labels)


def test_models_are_staggered_and_reset_after_max_online_updates():
    method, _ = build_frepo(num_nn_state=3, max_online_updates=7)
    syn = method.init_synthetic()
    assert [model.age for model in method.pool] == [0, 2, 4]
    method.pool = method.pool[:1]  # follow one model
    method.current = 0
    first = method.pool[0]
    weights = [p.detach().clone() for p in first.net.parameters()]
    for _ in range(8):  # ages 0..7: trained (the reference resets a model once its age exceeds the limit)
        method.online_update(syn)
    assert method.pool[0] is first and first.age == 8 and method.resets == 0
    assert any(not torch.equal(a, b) for a, b in zip(weights, first.net.parameters()))
    method.online_update(syn)
    assert method.pool[0] is not first and method.pool[0].age == 0 and method.resets == 1


def test_resumed_state_continues_the_pool():
    method, _ = build_frepo()
    syn = method.init_synthetic()
    method.step(syn, 1)
    state = method.state_dict()
    other, _ = build_frepo()
    other_syn = other.init_synthetic()
    other.load_state_dict(state)
    assert [m.age for m in other.pool] == [m.age for m in method.pool] and other.current == method.current
    for a, b in zip(other.pool[0].net.parameters(), method.pool[0].net.parameters()):
        assert torch.equal(a, b)
    assert other.scheduler.last_epoch == 1 and other_syn.label_values is not None


def test_resume_equals_uninterrupted(tmp_path):
    record = tiny_record()
    cfg = methods.DistillConfig(method="FRePo", dataset="Tiny3", model="ConvNetW32", ipc=2, iterations=6, lr_img=0.01,
                                batch_real=16, batch_train=8, init="real", dsa_strategy="",
                                extra={"num_nn_state": 2, "max_online_updates": 2})

    def opts(name, **kw):
        return RunOptions(num_exp=1, num_eval=0, run_dir=str(tmp_path / name), checkpoint_every=0, save_vis=False, **kw)

    full = run_distillation(cfg, opts("full"), record, torch.device("cpu"))
    stop = StopFlag()

    def interrupt(exp, iteration, logs):
        stop.requested = stop.requested or iteration == 3

    with pytest.raises(RunInterrupted):
        run_distillation(cfg, opts("cut"), record, torch.device("cpu"), stop=stop, on_iteration=interrupt)
    resumed = run_distillation(cfg, opts("cut", resume=True), record, torch.device("cpu"))
    a, b = (files.load_results(outcome.result_path)["data"][0] for outcome in (full, resumed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_squared_error_evaluation_learns_real_valued_labels():
    record = tiny_record()
    images, labels = record.images_train, record.labels_train
    targets = centred_one_hot(labels, record.num_classes)
    cfg = evaluation.EvalConfig(epochs=15, lr=0.01, batch_train=16, label_loss="mse_sum")
    assert cfg.describe()["label_loss"] == "mse_sum"
    net = networks.get_network("ConvNetW32", 1, 3, (8, 8))
    acc = evaluation.train_and_test(net, images, targets, record.images_test, record.labels_test, cfg,
                               utils.make_generator(0))
    assert acc > 0.8


def run_tiny(tmp_path, monkeypatch, *extra):
    monkeypatch.setattr("cli.load_record", lambda *args, **kwargs: tiny_record())
    run_dir = tmp_path / "run"
    return distill.main(["--method", "FRePo", "--dataset", "MNIST", "--model", "ConvNetW32", "--ipc", "2",
                         "--Iteration", "3", "--batch_real", "16", "--num_eval", "1", "--epoch_eval_train", "2",
                         "--num_nn_state", "2", "--run_dir", str(run_dir), "--threads", "1", "--no-vis",
                         *extra]), run_dir


def test_distill_saves_real_valued_labels_and_evaluates_them_by_squared_error(tmp_path, monkeypatch):
    code, run_dir = run_tiny(tmp_path, monkeypatch)
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    protocol = results["protocol"]["ConvNetW32"]
    assert protocol["labels"] == "learned real-valued" and protocol["label_loss"] == "mse_sum"
    path = os.path.join(str(run_dir), files.result_filename("FRePo", "MNIST", "ConvNetW32", 2))
    labels = files.load_results(path)["data"][0][1]
    assert labels.shape == (6, 3) and labels.dtype == torch.float32 and labels.min() < 0
    _, experiments = evaluate_flags.read_experiments(path, tiny_record(), dataset="MNIST", label_loss="mse_sum")
    assert torch.equal(experiments[0].labels, labels)  # kept as values, not turned into probabilities
    _, experiments = evaluate_flags.read_experiments(path, tiny_record(), dataset="MNIST", label_loss="cross_entropy")
    assert torch.allclose(experiments[0].labels, torch.softmax(labels, dim=1))  # --label_loss cross_entropy: probabilities


@pytest.mark.parametrize("flag,value,needle", [
    ("--num_nn_state", "0", "--num_nn_state must be >= 1"),
    ("--reg", "-1", "--reg must be >= 0"),
    ("--label_loss", "hinge", "--label_loss 'hinge'"),
    ("--dis_metric", "mse", "--dis_metric mse: --method FRePo does not use this flag"),
])
def test_bad_flags_are_one_line(tmp_path, monkeypatch, capsys, flag, value, needle):
    with pytest.raises(SystemExit) as stop:
        run_tiny(tmp_path, monkeypatch, flag, value)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_use_flip_doubles_the_support_in_the_loss_with_mirror_images(monkeypatch):
    method, _ = build_frepo(use_flip=True)
    syn = method.init_synthetic()
    n = syn.images.shape[0]
    images, labels = method.support(syn)
    assert images.shape[0] == 2 * n and labels.shape[0] == 2 * n
    assert torch.equal(images[:n], syn.images) and torch.equal(images[n:], torch.flip(syn.images, dims=[-1]))
    assert not torch.equal(images[n:], syn.images)  # the tiny images are not mirror-symmetric
    assert torch.equal(labels[n:], syn.label_values) and torch.equal(labels[:n], syn.label_values)
    seen = {}
    real_solve = frepo_module.kernel_ridge_regression

    def spy(k_ts, k_ss, y_s, reg):
        seen.update(k_ss=k_ss.detach(), y_s=y_s.detach())
        return real_solve(k_ts, k_ss, y_s, reg)

    monkeypatch.setattr(frepo_module, "kernel_ridge_regression", spy)
    net = method.pool[method.current].net
    method.loss(syn)
    features = net.embed(torch.cat([syn.images, torch.flip(syn.images, dims=[-1])])).detach()
    assert seen["k_ss"].shape == (2 * n, 2 * n)
    assert torch.allclose(seen["k_ss"], features @ features.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["y_s"], torch.cat([syn.label_values, syn.label_values]).detach())
    method.step(syn, 1)
    assert syn.images.shape[0] == n and syn.label_values.shape[0] == n  # the stored set has no mirror copies


def test_without_use_flip_the_support_is_the_set():
    method, _ = build_frepo()
    syn = method.init_synthetic()
    images, labels = method.support(syn)
    assert images is syn.images and labels is syn.label_values


@pytest.mark.parametrize("dataset,ipc,use_flip,zca", [
    ("CIFAR10", 1, True, True), ("CIFAR10", 50, True, True), ("cifar100", 1, True, True), ("CIFAR100", 10, False, True),
    ("Tiny", 1, True, True), ("TinyImageNet", 10, False, True), ("MNIST", 1, False, False),
    ("FashionMNIST", 10, False, False), ("SVHN", 1, False, False), ("imagenette", 10, True, False),
])
def test_per_dataset_defaults_follow_the_reference(dataset, ipc, use_flip, zca):
    assert frepo_module.frepo_dataset_defaults(dataset, ipc) == {"use_flip": use_flip, "zca": zca}
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--method", "FRePo", "--dataset", dataset,
                                                             "--ipc", str(ipc)]))
    assert cfg.zca is zca and cfg.extra["use_flip"] is use_flip  # recorded in the frozen config


def test_given_zca_and_use_flip_override_the_per_dataset_defaults():
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(
        ["--method", "FRePo", "--dataset", "FashionMNIST", "--zca", "--use_flip", "true"]))
    assert cfg.zca is True and cfg.extra["use_flip"] is True
    # --zca is a data flag: given or not, it never reaches the method's options (which refuse it)
    assert "zca" not in cfg.extra and frepo_module.FRePo.resolve_options(cfg.extra).use_flip is True
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(
        ["--method", "FRePo", "--dataset", "CIFAR10", "--no-zca", "--use_flip", "false"]))
    assert cfg.zca is False and cfg.extra["use_flip"] is False and "zca" not in cfg.extra
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--method", "DM", "--dataset", "CIFAR10"]))
    assert cfg.zca is False and "use_flip" not in cfg.extra  # other methods keep --zca off


def test_distill_loads_the_data_with_the_resolved_zca(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("cli.load_record", lambda args, *rest, **kwargs: seen.append(args.zca) or tiny_record())
    run_dir = tmp_path / "run"
    code = distill.main(["--method", "FRePo", "--dataset", "CIFAR10", "--model", "ConvNetW32", "--ipc", "2",
                         "--Iteration", "1", "--batch_real", "16", "--num_eval", "0", "--num_nn_state", "2",
                         "--run_dir", str(run_dir), "--threads", "1", "--no-vis"])
    assert code == 0 and seen == [True]
    text = json.dumps(json.loads((run_dir / "results.json").read_text()))
    assert '"use_flip": true' in text and '"zca": true' in text
