"""``--tesla_grad first_order`` (TESLA's released meta-gradient, methods/tesla.py) against a
hand-written first-order accumulation on a two-layer linear student, its distance from the exact
gradient (zero with one step, growing with the step size), and ``--teacher_label``."""
import types

import pytest
import torch
import torch.nn.functional as F

import utils
from cli import distill_flags
from methods import tesla
from methods.mtt import flatten
from methods.mtt_options import MTTOptions
from tiny_data import build_mtt

D_IN, HIDDEN, K, N = 5, 4, 3, 6  # input size, hidden width, classes, synthetic images


def linear_loss(w, images, targets):
    """Cross-entropy of the two-layer linear net ``x W1^T W2^T`` with W1 (HIDDEN, D_IN), W2 (K, HIDDEN)."""
    w1 = w[:HIDDEN * D_IN].view(HIDDEN, D_IN)
    w2 = w[HIDDEN * D_IN:].view(K, HIDDEN)
    return F.cross_entropy(images.flatten(1) @ w1.t() @ w2.t(), targets)


class ToyMethod:
    """What tesla.unroll needs from a method: options, batches in a fixed order, the step loss."""

    def __init__(self, steps, mode, batches):
        self.options = MTTOptions(syn_steps=steps, tesla=True, tesla_grad=mode)
        self.dsa_strategy, self.generator, self.addons = "", torch.Generator(), []
        self.batches, self.drawn = batches, 0

    def next_batch(self, n):
        index = self.batches[self.drawn % len(self.batches)]
        self.drawn += 1
        return index

    def student_loss(self, w, syn, index, images, targets):
        return linear_loss(w, images, targets)

    def unroll_targets(self, syn):
        return syn.labels


def toy_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, 1, 1, D_IN, generator=g)
    labels = torch.arange(N) % K
    start = 0.5 * torch.randn(HIDDEN * D_IN + K * HIDDEN, generator=g)
    target = start + 0.3 * torch.randn(start.shape, generator=g)
    batches = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([5, 0, 1])]
    return images, labels, start, target, batches


def sweep_gradients(mode, steps, lr, seed=0):
    """(dL/dx, dL/dalpha) of L = ||w_N - w*||^2 / ||w_0 - w*||^2 through tesla.unroll."""
    images, labels, start, target, batches = toy_problem(seed)
    syn = types.SimpleNamespace(images=images.clone().requires_grad_(True),
                                syn_lr=torch.tensor(lr).requires_grad_(True), labels=labels)
    final = tesla.unroll(ToyMethod(steps, mode, batches), syn, start)
    loss = ((final - target) ** 2).sum() / ((start - target) ** 2).sum()
    return torch.autograd.grad(loss, [syn.images, syn.syn_lr])


def hand_first_order(steps, lr, seed=0):
    """TESLA's accumulation written out: G = sum of the detached step gradients,
    dL/dx_i = (2 / D) d/dx_i [(lr (w* - w_0) + lr^2 G) . g_i(w_i, x_i)], dL/dlr = -(2 / D)(w_N - w*) . G."""
    images, labels, start, target, batches = toy_problem(seed)
    params, grads = [start], []
    for t in range(steps):
        index = batches[t % len(batches)]
        w = params[-1].clone().requires_grad_(True)
        g = torch.autograd.grad(linear_loss(w, images[index], labels[index]), w)[0]
        grads.append(g)
        params.append(params[-1] - lr * g)
    total = torch.stack(grads).sum(0)
    dist = ((start - target) ** 2).sum()
    grad_x = torch.zeros_like(images)
    for t in range(steps):
        index = batches[t % len(batches)]
        x = images.clone().requires_grad_(True)
        w = params[t].clone().requires_grad_(True)
        g = torch.autograd.grad(linear_loss(w, x[index], labels[index]), w, create_graph=True)[0]
        term = 2 * (lr * (target - start) + lr ** 2 * total) @ g / dist
        grad_x += torch.autograd.grad(term, x)[0]
    grad_lr = -2 * (start - lr * total - target) @ total / dist
    return grad_x, grad_lr


def full_unroll(steps, lr, seed=0):
    """The exact meta-gradient by back-propagating through every step (create_graph)."""
    images, labels, start, target, batches = toy_problem(seed)
    x = images.clone().requires_grad_(True)
    alpha = torch.tensor(lr).requires_grad_(True)
    w = start.clone().requires_grad_(True)
    for t in range(steps):
        index = batches[t % len(batches)]
        w = w - alpha * torch.autograd.grad(linear_loss(w, x[index], labels[index]), w, create_graph=True)[0]
    loss = ((w - target) ** 2).sum() / ((start - target) ** 2).sum()
    return torch.autograd.grad(loss, [x, alpha])


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("steps,lr", [(1, 0.1), (4, 0.05), (6, 0.5)])
def test_first_order_equals_the_hand_written_accumulation(steps, lr):
    swept_x, swept_lr = sweep_gradients("first_order", steps, lr)
    hand_x, hand_lr = hand_first_order(steps, lr)
    assert float(hand_x.norm()) > 0
    assert torch.allclose(swept_x, hand_x, rtol=1e-5, atol=1e-7)
    assert torch.allclose(swept_lr, hand_lr, rtol=1e-5)


def test_exact_mode_is_the_full_unroll():
    for a, b in zip(sweep_gradients("exact", 6, 0.3), full_unroll(6, 0.3)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_first_order_equals_exact_with_one_step():
    for a, b in zip(sweep_gradients("first_order", 1, 0.5), sweep_gradients("exact", 1, 0.5)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_first_order_departs_from_exact_as_the_step_size_grows():
    gaps = []
    for lr in (0.01, 0.1, 0.5):
        first = sweep_gradients("first_order", 6, lr)[0]
        exact = sweep_gradients("exact", 6, lr)[0]
        gaps.append(relative(first, exact))
    assert gaps[0] > 1e-4  # the dropped Hessian terms are visible even at lr 0.01
    assert gaps[0] < gaps[1] < gaps[2]
    assert gaps[2] > 10 * gaps[0]


def test_flags_resolve_with_exact_as_the_default():
    base = ["--dataset", "MNIST", "--method", "MTT"]
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(base))
    assert cfg.extra.get("tesla_grad", "exact") == "exact" and not cfg.extra.get("teacher_label", False)
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(base + ["--tesla", "--tesla_grad", "first_order",
                                                                    "--teacher_label"]))
    assert cfg.extra["tesla_grad"] == "first_order" and cfg.extra["teacher_label"] is True


def test_first_order_without_tesla_and_teacher_label_with_datm_are_refused(buffer_root):
    with pytest.raises(utils.UserError, match="--tesla_grad first_order .* add --tesla"):
        build_mtt("MTT", buffer_root, tesla_grad="first_order")
    with pytest.raises(utils.UserError, match="--teacher_label is MTT's"):
        build_mtt("DATM", buffer_root, teacher_label=True)


def test_first_order_step_runs_on_mtt(one_thread, buffer_root):
    m, _ = build_mtt("MTT", buffer_root, tesla=True, tesla_grad="first_order")
    syn = m.init_synthetic()
    before = syn.images.detach().clone()
    m.step(syn, 1)
    assert not torch.equal(syn.images.detach(), before)


def test_teacher_label_targets_are_the_target_experts_probabilities(one_thread, buffer_root):
    m, _ = build_mtt("MTT", buffer_root, teacher_label=True, max_start_epoch=1, expert_epochs=1)
    syn = m.init_synthetic()
    trajectory = m.experts.next()
    m.experts.next = lambda: trajectory
    m.step(syn, 1)  # start epoch 0, target epoch 1; the images moved after labelling
    targets = m.unroll_targets(syn)
    assert targets.shape == (syn.images.shape[0], m.num_classes)
    m.student_net.eval()
    with torch.no_grad():
        expected = torch.softmax(m.student(flatten(trajectory[1]), syn.images.detach()), dim=1)
    assert not torch.allclose(targets, expected)  # labels were taken before this step's update
    m.step(syn, 2)
    assert torch.allclose(m.unroll_targets(syn), expected, atol=1e-6)
    assert torch.allclose(m.unroll_targets(syn).sum(1), torch.ones(syn.images.shape[0]))
