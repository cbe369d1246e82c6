"""KIP and its kernels (methods/kernels.py, methods/kip.py): closed-form FC kernels against wide random
networks, kernel ridge regression, the random-feature ConvNet kernel, the KIP loss, learned
real-valued labels in evaluation, and the command line."""
import json
import math

import pytest
import torch

import data
import distill
import evaluate
import evaluation
from methods import kernels
from methods.runner import RunOptions, run_distillation
from sets import files
from tiny_data import CPU, build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks on a busy 2-core machine


def wide_fc(x, width, depth, out, generator, w_std=kernels.W_STD, b_std=kernels.B_STD):
    """Parameters (standard normal, NTK parameterisation) and the output (N, out) of a random
    fully connected ReLU network with ``depth`` hidden layers of ``width``."""
    sizes = [x.shape[1]] + [width] * depth + [out]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64).requires_grad_(),
                   torch.randn(fan_out, generator=generator, dtype=torch.float64).requires_grad_()]
    return params


def forward(params, x, w_std=kernels.W_STD, b_std=kernels.B_STD):
    h = x
    layers = len(params) // 2
    for i in range(layers):
        weight, bias = params[2 * i], params[2 * i + 1]
        h = w_std / math.sqrt(weight.shape[1]) * h @ weight.T + b_std * bias
        if i < layers - 1:
            h = torch.relu(h)
    return h


@pytest.fixture
def inputs():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("depth", [1, 2])
def test_fc_nngp_equals_the_output_covariance_of_wide_random_networks(inputs, depth):
    # E[f(x) f(x')] over the initialisation: 16 networks of width 1024, each with 1024 output units
    # (independent samples given the hidden layers). Tolerance 6 % of the largest entry; the
    # Monte-Carlo and finite-width error measured over seeds 0-2 was 1.5-3.2 %.
    g = torch.Generator().manual_seed(0)
    estimate = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(16):
        with torch.no_grad():
            out = forward(wide_fc(inputs, 1024, depth, 1024, g), inputs)  # (N, units)
        estimate += out @ out.T / out.shape[1] / 16
    exact = kernels.fc_nngp(inputs, inputs, depth)
    assert torch.allclose(estimate, exact, atol=0.06 * exact.abs().max())
    assert not torch.allclose(exact, kernels.fc_nngp(inputs, inputs, depth + 1), atol=0.06 * exact.abs().max())


@pytest.mark.parametrize("depth", [1, 2])
def test_fc_ntk_equals_the_gradient_inner_products_of_wide_random_networks(inputs, depth):
    # <df/dtheta(x), df/dtheta(x')> of one output unit, NTK parameterisation, width 2048, mean of 4
    # networks; tolerance 8 % of the largest entry; the finite-width error measured over seeds 0-2
    # was 1.1-2.0 % (depth 1) and 2.0-4.7 % (depth 2).
    g = torch.Generator().manual_seed(0)
    estimate = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(4):
        params = wide_fc(inputs, 2048, depth, 1, g)
        grads = []
        for i in range(inputs.shape[0]):
            value = forward(params, inputs[i:i + 1]).sum()
            grads.append(torch.cat([grad.reshape(-1) for grad in torch.autograd.grad(value, params)]))
        jacobian = torch.stack(grads)
        estimate += jacobian @ jacobian.T / 4
    exact = kernels.fc_ntk(inputs, inputs, depth)
    assert torch.allclose(estimate, exact, atol=0.08 * exact.abs().max())
    assert not torch.allclose(exact, kernels.fc_ntk(inputs, inputs, depth + 1), atol=0.08 * exact.abs().max())


def test_krr_with_the_targets_as_support_and_no_ridge_predicts_them_exactly(inputs):
    labels = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = kernels.fc_ntk(inputs, inputs, 1)
    assert torch.allclose(kernels.kernel_ridge_regression(k, k, labels, 0.0), labels, atol=1e-9)
    # A ridge shrinks the fit; the trace scaling makes it invariant to the kernel's scale.
    ridged = kernels.kernel_ridge_regression(k, k, labels, 0.5)
    assert not torch.allclose(ridged, labels, atol=1e-3)
    assert torch.allclose(kernels.kernel_ridge_regression(10 * k, 10 * k, labels, 0.5), ridged)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.kernel_ridge_regression(k[:, :3], k, labels, 0.0)


def conv_kernel(n_models, seed, images):
    pool = kernels.RandomConvFeatures("ConvNetNN", n_models, channel=1, num_classes=3, im_size=(8, 8), device=CPU,
                                      generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pool.kernel(images, images)


def test_random_feature_conv_kernel_is_symmetric_psd_and_converges_with_more_networks():
    images = tiny_record().images_train[::8][:6]
    reference = conv_kernel(128, 100, images)
    assert torch.allclose(reference, reference.T)
    assert torch.linalg.eigvalsh(reference).min() > -1e-9 * reference.abs().max()

    def mean_squared_error(n_models):  # over 8 independent pools, relative to the reference's scale
        return sum(float(((conv_kernel(n_models, seed, images) - reference) ** 2).sum()) for seed in range(8)) / (
            8 * float((reference ** 2).sum()))

    # The estimate is unbiased with variance V / n_models, so E||K_M - K_ref||^2 = V/M + V/128:
    # 0.51 V for M = 2 and 0.07 V for M = 16 (ratio 0.14).
    few, many = mean_squared_error(2), mean_squared_error(16)
    assert many < 0.4 * few, (few, many)


def test_kip_loss_falls_and_changes_images_and_labels():
    record = tiny_record()
    # target_batch_size 72 = the whole training set every iteration, so the losses are comparable.
    method = build_method("KIP", record, learn_labels=True, target_batch_size=72, lr_img=0.05, init="noise")
    syn = method.init_synthetic()
    images, labels = syn.images.detach().clone(), syn.label_values.detach().clone()
    assert torch.allclose(labels, evaluation.centred_one_hot(syn.labels, 3))
    losses = [float(method.step(syn, iteration)["loss"]) for iteration in range(1, 16)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(syn.images, images) and not torch.equal(syn.label_values, labels)
    assert torch.equal(syn.targets(), syn.label_values.detach()) and syn.export_labels().shape == (6, 3)


@pytest.mark.parametrize("kernel", ["fc_nngp", "conv_rf"])
def test_kip_other_kernels_and_fixed_labels_learn_images_only(kernel):
    method = build_method("KIP", tiny_record(), kernel=kernel, n_models=2, target_batch_size=30)
    syn = method.init_synthetic()
    images = syn.images.detach().clone()
    logs = method.step(syn, 1)
    assert torch.isfinite(logs["loss"]) and 0 <= float(logs["krr_acc"]) <= 1
    assert not torch.equal(syn.images, images) and syn.label_values is None
    assert syn.export_labels().dtype == torch.int64


def test_mse_label_loss_trains_on_centred_one_hot_or_learned_labels():
    labels = torch.tensor([0, 2])
    assert torch.allclose(evaluation.regression_targets(labels, 3), torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]]))
    values = torch.randn(2, 3)
    assert torch.equal(evaluation.regression_targets(values, 3), values)
    logits = torch.zeros(2, 3, requires_grad=True)
    # mse: the KIP colab's 0.5 * mean over the K outputs (summed over the batch here; the caller
    # divides by B); mse_sum: FRePo's sum over the outputs, K times larger.
    assert torch.isclose(evaluation.label_loss_sum(logits, values, "mse"), 0.5 * (values ** 2).sum() / 3)
    assert torch.isclose(evaluation.label_loss_sum(logits, values, "mse_sum"), 0.5 * (values ** 2).sum())
    with pytest.raises(ValueError, match="expected one of"):
        evaluation.label_loss_sum(logits, values, "hinge")


def test_kip_run_saves_learned_labels_and_evaluates_them_with_the_square_loss(tmp_path, monkeypatch, capsys):
    record = tiny_record()
    method = build_method("KIP", record, learn_labels=True, target_batch_size=30, iterations=3)
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=("ConvNetW32",), epoch_eval_train=2,
                      run_dir=str(tmp_path / "kip"), save_vis=False)
    outcome = run_distillation(method.cfg, opts, record, CPU)
    blob = files.load_results(outcome.result_path)
    labels = blob["data"][0][1]
    assert labels.shape == (6, 3) and labels.dtype == torch.float32
    assert not torch.allclose(labels, evaluation.centred_one_hot(torch.arange(3).repeat_interleave(2), 3))
    assert blob["meta"]["protocol"]["label_loss"] == "mse"
    results = json.load(open(tmp_path / "kip" / "results.json"))
    protocol = results["protocol"]["ConvNetW32"]
    assert protocol["label_loss"] == "mse" and protocol["labels"] == "learned real-valued" and protocol["lr"] == 0.01
    # evaluate.py replays the saved protocol: the real-valued labels are fitted as they are (no softmax).
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", outcome.result_path, "--models", "ConvNetW32",
                          "--num_eval", "1", "--random_baseline", "--out", str(out)]) == 0
    report = json.load(open(out))
    assert report["ConvNetW32"]["protocol"]["labels"] == "learned real-valued"
    assert report["ConvNetW32"]["protocol"]["label_loss"] == "mse"
    assert "random real ipc 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--kernel", "rbf"], "--kernel 'rbf': expected one of fc_ntk, fc_nngp, conv_rf"),
    (["--reg", "-1"], "--reg must be >= 0, got -1"),
    (["--batch_real", "10"], "--batch_real 10: --method KIP does not use this flag"),
    (["--label_loss", "hinge"], "--label_loss 'hinge': expected one of cross_entropy, mse, mse_sum"),
])
def test_bad_kip_flag_is_one_line(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: tiny_record())
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "KIP", "--dataset", "Tiny3", "--run_dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_krr_accuracy_is_perfect_on_the_support_and_refuses_random_kernels():
    from methods.kip import krr_accuracy

    record = tiny_record()
    images, labels = record.images_train, record.labels_train
    assert krr_accuracy(images, labels, images, labels, 3, reg=0.0) == 1.0
    assert 0.5 < krr_accuracy(images[::8], labels[::8], record.images_test, record.labels_test, 3) <= 1.0
    with pytest.raises(ValueError, match="fc_ntk or fc_nngp"):
        krr_accuracy(images, labels, images, labels, 3, kernel="conv_rf")
