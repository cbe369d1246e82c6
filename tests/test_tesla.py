"""TESLA's constant-memory meta-gradient (methods/tesla.py): the same gradient as the unrolled
student for MTT, DATM and PAD, graph memory flat in syn_steps, the --tesla flag, and the refusal
of an add-on that changes the student's step loss."""
import dataclasses

import pytest
import torch

import utils
from cli import distill_flags
from methods.addons.feature_labels import FeatureLabelConfig
from methods.mtt import flatten
from sets.resources import SavedTensorMeter
from tiny_data import build_mtt


def matching_gradients(m, syn, start, target, tesla):
    """The matching loss and its gradients w.r.t. images, syn_lr (and soft-label logits)."""
    m.options = dataclasses.replace(m.options, tesla=tesla)
    loss = m.matching_loss(m.unroll(syn, start), start, target)
    leaves = [syn.images, syn.syn_lr] + ([syn.label_logits] if syn.label_logits is not None else [])
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", ["MTT", "DATM", "PAD"])
def test_tesla_gradient_equals_the_unrolled_gradient(one_thread, buffer_root, name):
    extra = {"loss_ratio": 0.25, "depth_ratio": 0.1} if name == "PAD" else {}
    m, _ = build_mtt(name, buffer_root, syn_steps=5, batch_syn=4, **extra)
    assert m.dsa_strategy  # every step is augmented, so the replay of the draws is tested
    syn = m.init_synthetic()
    trajectory = m.experts.next()
    start, target = flatten(trajectory[1]), flatten(trajectory[2])
    generator_state = m.generator.get_state()  # every unroll draws its minibatches afresh from it
    unrolled_loss, unrolled = matching_gradients(m, syn, start, target, tesla=False)
    m.generator.set_state(generator_state)
    tesla_loss, swept = matching_gradients(m, syn, start, target, tesla=True)
    assert torch.allclose(tesla_loss, unrolled_loss, rtol=1e-6)  # same minibatches and augmentations
    assert len(swept) == (3 if name != "MTT" else 2)
    for a, b in zip(unrolled, swept):
        assert float(a.norm()) > 0
        assert torch.allclose(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_tesla_gradient_differs_when_the_replay_is_wrong(one_thread, buffer_root):
    # The comparison above can fail: other augmentation draws give another gradient.
    m, _ = build_mtt("MTT", buffer_root, syn_steps=3, batch_syn=4)
    syn = m.init_synthetic()
    trajectory = m.experts.next()
    start, target = flatten(trajectory[0]), flatten(trajectory[1])
    _, first = matching_gradients(m, syn, start, target, tesla=False)
    _, second = matching_gradients(m, syn, start, target, tesla=True)
    assert not torch.allclose(first[0], second[0], rtol=1e-2)


def graph_peak_bytes(buffer_root, steps, tesla):
    m, _ = build_mtt("DATM", buffer_root, syn_steps=steps, batch_syn=4, tesla=tesla)
    syn = m.init_synthetic()
    trajectory = m.experts.next()
    start, target = flatten(trajectory[0]), flatten(trajectory[1])
    with SavedTensorMeter() as meter:
        m.matching_loss(m.unroll(syn, start), start, target).backward()
    assert meter.live_bytes == 0  # every graph was freed
    return meter.peak_bytes


def test_tesla_graph_memory_does_not_grow_with_syn_steps(one_thread, buffer_root):
    unrolled = [graph_peak_bytes(buffer_root, steps, tesla=False) for steps in (4, 16)]
    swept = [graph_peak_bytes(buffer_root, steps, tesla=True) for steps in (4, 16)]
    assert unrolled[1] > 3 * unrolled[0]  # the unrolled graph grows about linearly
    assert swept[1] <= 1.05 * swept[0]
    assert swept[1] < unrolled[1] / 3


@pytest.mark.parametrize("name", ["MTT", "DATM", "PAD"])
def test_flag_defaults_off_and_resolves(name):
    base = ["--dataset", "MNIST", "--method", name]
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(base))
    assert cfg.extra.get("tesla", False) is False
    cfg, _ = distill_flags.resolve(distill_flags.parse_args(base + ["--tesla"]))
    assert cfg.extra["tesla"] is True


def test_tesla_step_updates_images_lr_and_labels(one_thread, buffer_root):
    m, _ = build_mtt("DATM", buffer_root, tesla=True, threshold=100.0)
    syn = m.init_synthetic()
    before = [syn.images.detach().clone(), syn.syn_lr.detach().clone(), syn.label_logits.detach().clone()]
    logs = m.step(syn, 1)
    assert float(logs["skipped"]) == 0.0
    after = [syn.images, syn.syn_lr, syn.label_logits]
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, after))


def test_tesla_refuses_feature_labels(one_thread, buffer_root):
    m, _ = build_mtt("MTT", buffer_root, tesla=True,
                     addons={"feature_labels": FeatureLabelConfig(lbd=0.1, feat_lbd=0.02, feat_init="random")})
    syn = m.init_synthetic()
    with pytest.raises(utils.UserError, match="--tesla does not support the feature_labels"):
        m.step(syn, 1)
