"""RaT-BPTT (methods/ratbptt.py): the truncated unroll against a hand-unrolled linear softmax model
(analytic inner gradients, torch.optim for the detached steps), the inner optimisers against
torch.optim, the window draws (per epoch, --complete_random, --minwindow), the EMA clipping, the
learned labels, resume state and one-line flag mistakes."""
import pytest
import torch
import torch.nn.functional as F

import utils
from cli import distill_flags
from methods.ratbptt import EmaClip, inner_step, truncated_unroll
from tiny_data import build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")

K, D, N = 3, 4, 6  # classes, input size, synthetic images


def linear_loss(w, x, y):
    """Mean cross-entropy of ``x W^T`` with W (K, D) flattened in ``w``."""
    return F.cross_entropy(x @ w.view(K, D).t(), y)


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, D, generator=g)
    labels = torch.arange(N) % K
    start = 0.3 * torch.randn(K * D, generator=g)
    real_x, real_y = torch.randn(10, D, generator=g), torch.arange(10) % K
    batches = [torch.tensor(b) for b in ([0, 1, 2], [3, 4, 5], [0, 4, 5], [1, 2, 3], [2, 3, 4], [5, 0, 1])]
    return images, labels, start, real_x, real_y, batches


def hand_unroll_gradient(detached, lr, momentum=0.9, wd=5e-4):
    """d meta-loss / d images by hand: torch.optim.SGD on a bias-free nn.Linear for the detached
    steps, then the window with the analytic CE gradient (softmax(XW^T) - Y)^T X / B and SGD's
    momentum/weight-decay update written out."""
    images, labels, start, real_x, real_y, batches = toy()
    layer = torch.nn.Linear(D, K, bias=False)
    with torch.no_grad():
        layer.weight.copy_(start.view(K, D))
    sgd = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for index in batches[:detached]:
        sgd.zero_grad()
        F.cross_entropy(layer(images[index]), labels[index]).backward()
        sgd.step()
    weight = layer.weight.detach().clone()
    buf = sgd.state[layer.weight]["momentum_buffer"].clone() if detached else None
    x_all = images.clone().requires_grad_(True)
    for index in batches[detached:]:
        x, y = x_all[index], F.one_hot(labels[index], K).float()
        grad = (torch.softmax(x @ weight.t(), dim=1) - y).t() @ x / x.shape[0] + wd * weight
        buf = grad if buf is None else momentum * buf + grad
        weight = weight - lr * buf
    meta = F.cross_entropy(real_x @ weight.t(), real_y)
    return torch.autograd.grad(meta, x_all)[0]


def unroll_gradient(detached, lr, optim="SGD"):
    images, labels, start, real_x, real_y, batches = toy()
    x_all = images.clone().requires_grad_(True)
    final = truncated_unroll(linear_loss, start, x_all, labels, batches, detached, optim, lr)
    meta = F.cross_entropy(real_x @ final.view(K, D).t(), real_y)
    return torch.autograd.grad(meta, x_all)[0]


@pytest.mark.parametrize("detached", [0, 2, 4])
def test_meta_gradient_equals_a_hand_unroll_over_exactly_the_window(detached):
    ours, hand = unroll_gradient(detached, 0.5), hand_unroll_gradient(detached, 0.5)
    assert float(hand.norm()) > 0
    assert torch.allclose(ours, hand, rtol=1e-5, atol=1e-7)
    # images the window never sees get no gradient: step 4 and 5 use 2, 3, 4, 5, 0, 1 ... so check
    # a window of one step ([5, 0, 1]): images 2, 3, 4 are untouched by it
    last = unroll_gradient(5, 0.5)
    assert torch.equal(last[[2, 3, 4]], torch.zeros(3, D)) and float(last[[5, 0, 1]].norm()) > 0


def test_the_window_changes_the_gradient():
    assert not torch.allclose(unroll_gradient(0, 0.5), unroll_gradient(2, 0.5), rtol=1e-3)


@pytest.mark.parametrize("optim", ["SGD", "Adam"])
def test_inner_steps_follow_torch_optim(optim):
    images, labels, start, _, _, batches = toy()
    layer = torch.nn.Linear(D, K, bias=False)
    with torch.no_grad():
        layer.weight.copy_(start.view(K, D))
    reference = (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) if optim == "SGD"
                 else torch.optim.Adam(layer.parameters(), lr=0.1))
    params, state = start.clone(), {}
    for index in batches:
        reference.zero_grad()
        F.cross_entropy(layer(images[index]), labels[index]).backward()
        reference.step()
        w = params.clone().requires_grad_(True)
        grad = torch.autograd.grad(linear_loss(w, images[index], labels[index]), w)[0]
        params, state = inner_step(params, grad, state, optim, 0.1)
    assert torch.allclose(params, layer.weight.detach().reshape(-1), rtol=1e-5, atol=1e-6)
    final = truncated_unroll(linear_loss, start, images, labels, batches, len(batches), optim, 0.1)
    assert torch.allclose(final, params, atol=1e-6)  # fully detached: the same trajectory


def test_adam_window_back_propagates_finite_values():
    images, labels, start, real_x, real_y, batches = toy()
    x_all = images.clone().requires_grad_(True)
    final = truncated_unroll(linear_loss, start, x_all, labels, batches, 1, "Adam", 0.05)
    grad = torch.autograd.grad(F.cross_entropy(real_x @ final.view(K, D).t(), real_y), x_all)[0]
    assert torch.isfinite(grad).all() and float(grad.norm()) > 0


def test_ema_clip_follows_the_reference_average():
    clip = EmaClip(0.9)
    x = torch.zeros(4, requires_grad=True)
    x.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    assert clip.clip_(x) == 5.0 and clip.shadow == 5.0 and torch.allclose(x.grad.norm(), torch.tensor(5.0))
    x.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50: the average becomes 5 + 0.1 * 45 = 9.5
    assert clip.clip_(x) == 50.0 and clip.shadow == pytest.approx(9.5)
    assert float(x.grad.norm()) == pytest.approx(19.0, rel=1e-5)  # clipped to twice the average


def _rat(record, **overrides):
    fields = dict(ipc=2, batch_real=20, window=2, totwindow=6, lr_img=0.01)
    fields.update(overrides)
    return build_method("RaT-BPTT", record, **fields)


def test_window_is_drawn_per_epoch_or_every_iteration():
    record = tiny_record(per_class=20)  # 60 images, batch 20: 3 iterations per epoch
    method = _rat(record, minwindow=1)
    draws = []
    for iteration in range(1, 31):
        method.draw_window(iteration)
        draws.append(method.detached)
    assert all(1 <= d <= 4 for d in draws) and len(set(draws)) > 1
    assert all(len(set(draws[e:e + 3])) == 1 for e in range(0, 30, 3))  # constant within an epoch
    method = _rat(record, minwindow=1, complete_random=True)
    draws = []
    for iteration in range(1, 31):
        method.draw_window(iteration)
        draws.append(method.detached)
    assert any(len(set(draws[e:e + 3])) > 1 for e in range(0, 30, 3))


def test_real_batches_cover_the_training_set_once_per_epoch():
    record = tiny_record(per_class=20)
    method = _rat(record)
    seen = []
    for iteration in range(1, 4):
        method.draw_window(iteration)
        images, _ = method.real_batch(iteration)
        seen.append(images)
    assert torch.cat(seen).shape[0] == 60
    assert torch.unique(torch.cat(seen), dim=0).shape[0] == 60


def test_steps_learn_images_and_non_negative_labels_and_resume():
    record = tiny_record(per_class=8)
    method = _rat(record, train_y=True, init="real")
    syn = method.init_synthetic()
    images = syn.images.detach().clone()
    logs = [method.step(syn, iteration) for iteration in range(1, 4)]
    assert all(torch.isfinite(log["loss"]) for log in logs)
    assert all(2 <= float(log["unroll"]) <= 6 for log in logs)
    assert not torch.equal(syn.images.detach(), images)
    weights = method.label_weights.detach()
    assert (weights >= 0).all() and not torch.equal(weights, F.one_hot(syn.labels, 3).float())
    assert torch.allclose(syn.label_logits.detach().exp(), weights.clamp_min(1e-30))
    assert syn.label_kind() == "soft"
    state = method.state_dict()
    again = _rat(record, train_y=True, init="real")
    again.init_synthetic()
    again.load_state_dict(state)
    assert again.clip.shadow == method.clip.shadow and again.detached == method.detached
    assert torch.equal(again.label_weights.detach(), weights)


def test_hard_labels_without_train_y():
    method = _rat(tiny_record(per_class=8))
    syn = method.init_synthetic()
    method.step(syn, 1)
    assert syn.label_logits is None and method.label_weights is None


@pytest.mark.parametrize("argv,needle", [
    (["--window", "8", "--totwindow", "5"], "--window 8 exceeds --totwindow 5"),
    (["--window", "3", "--totwindow", "5", "--minwindow", "3"], "--minwindow 3 exceeds --totwindow - --window = 2"),
    (["--inner_optim", "RMSprop"], "--inner_optim 'RMSprop': expected one of SGD, Adam"),
])
def test_bad_flags_are_one_line(argv, needle):
    with pytest.raises(utils.UserError, match=needle.replace("+", r"\+")):
        args = distill_flags.parse_args(["--dataset", "MNIST", "--method", "RaT-BPTT", *argv])
        cfg, _ = distill_flags.resolve(args)
        build_method("RaT-BPTT", tiny_record(), **dict(cfg.extra))


def test_flags_resolve_with_the_reference_defaults():
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(["--dataset", "MNIST", "--method", "RaT-BPTT"]))
    assert cfg.lr_img == 0.01 and cfg.batch_real == 200 and cfg.init == "noise"
    options = build_method("RaT-BPTT", tiny_record()).options
    assert (options.window, options.totwindow, options.minwindow, options.inner_optim, options.inner_lr,
            options.batch_per_class, options.train_y, options.clip_coef) == (20, 20, 0, "SGD", 0.01, 1, False, 0.9)


def test_method_loss_reaches_only_the_images_of_the_window():
    record = tiny_record(per_class=8)
    method = _rat(record, ipc=3, batch_per_class=1, window=1, totwindow=4, minwindow=3, init="real")
    syn = method.init_synthetic()
    method.draw_window(1)
    assert method.detached == 3  # minwindow 3 = totwindow - window: the draw is forced
    state = method.generator.get_state()
    grad = torch.autograd.grad(method.loss(syn, 1), syn.images)[0]
    method.generator.set_state(state)
    last = method.inner_batches(4)[-1]  # the batches loss() drew: the window is the last one
    touched = grad.flatten(1).abs().sum(1) > 0
    assert touched.sum() == 3 and touched[last].all()  # one image per class, those of the last step
