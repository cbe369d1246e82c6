"""TESLA: the trajectory-matching meta-gradient with memory independent of ``syn_steps``.

Source: Cui, Wang, Si, Hsieh, "Scaling Up Dataset Distillation to ImageNet-1K with Constant
Memory", ICML 2023 (Section 3, the gradient of the MTT loss rewritten as a sum of per-step terms);
DATM ships the idea as ``distill/DATM_tesla.py`` of NUS-HPC-AI-Lab/DATM. The code here is our own
derivation. Two forms (``--tesla_grad``):

- ``exact`` (the default): the exact unrolled gradient, Hessian terms included; the same
  gradient as the full MTT unroll (:meth:`methods.mtt.MTT.unroll`), in constant graph memory.
- ``first_order``: TESLA's released form (justincui03/tesla ``distill.py``, the loop after the
  student's steps; DATM ``distill/DATM_tesla.py``, the same loop): each step's gradient is taken
  with the later parameters' dependence on earlier steps ignored, i.e. the sweep below with
  ``lam_t = lam_N`` for every t (no Hessian-vector products). With ``L = ||w_N - w*||^2 / D``,
  ``w_N = w_0 - alpha * G`` and ``G = sum_t g_t`` that is TESLA's accumulation
  ``dL/dx_t = (2 / D) d/dx_t [(alpha (w* - w_0) + alpha^2 G) . g_t]`` and
  ``dL/dalpha = -(2 / D) (w_N - w*) . G``. It equals ``exact`` with one step; the two differ more
  as ``alpha * H`` grows (larger step size, more steps).

The student takes ``N = syn_steps`` SGD steps from the expert's parameters ``w_0``::

    w_{t+1} = w_t - alpha * g_t,    g_t = grad_w l_t(w_t; x_t, y_t)

(``l_t`` the cross-entropy of step t's augmented minibatch). With ``lam_{t+1} = dL/dw_{t+1}`` the
update is linear in ``g_t``, so a backward sweep from ``t = N-1`` down to 0 gives::

    dL/dx_t    += -alpha * (d g_t / d x_t)^T lam_{t+1}     (images of step t's batch)
    dL/dy_t    += -alpha * (d g_t / d y_t)^T lam_{t+1}     (DATM's soft labels)
    dL/dalpha  += -lam_{t+1} . g_t
    lam_t       = lam_{t+1} - alpha * H_t lam_{t+1}        (Hessian-vector product)

Each term needs only step t's graph, rebuilt from the stored ``w_t`` and freed before step t-1:
the graph memory of one step instead of ``N`` (the stored ``w_t`` are ``N x P`` floats, as in
TESLA). Every step's minibatch indices and DiffAugment parameters are drawn once, in the forward
pass, in the same order as the unrolled student, and replayed in the sweep. (A BatchNorm
student's running statistics are updated again by the recomputed steps; a train-mode forward does
not read them, so the gradient is unchanged.)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

import augment
import progress
import utils
from methods.addons.base import UNROLL_LOSS


class _Sweep(torch.autograd.Function):
    """Autograd node: the student's final parameters w_N (P,) from the images, the step size and
    the step targets; its backward is the sweep of the module docstring."""

    @staticmethod
    def forward(ctx, method, syn, start, images, syn_lr, targets):
        opts = method.options
        augmenting = bool(method.dsa_strategy) and not opts.no_aug
        lr = syn_lr.detach()
        x_all, y_all = images.detach(), targets.detach()
        params = start.detach()
        stored: List[torch.Tensor] = []
        steps: List[Tuple[torch.Tensor, Optional[augment.DiffAugParams]]] = []
        for _ in range(opts.syn_steps):
            progress.tick()  # a progress line / a stop inside a long iteration (forward only)
            index = method.next_batch(x_all.shape[0])
            batch = x_all[index]
            drawn = None
            if augmenting:  # the draws of augment.diff_augment, kept for the replay
                drawn = augment.sample_diffaug_params(method.dsa_strategy, batch.shape[0], tuple(batch.shape[2:]),
                                                      method.generator, False)
                batch = augment.apply_diffaug(batch, drawn)
            stored.append(params)
            steps.append((index, drawn))
            with torch.enable_grad():
                w = params.clone().requires_grad_(True)
                loss = method.student_loss(w, syn, index, batch, y_all[index])
                grad = torch.autograd.grad(loss, w)[0]
            params = params - lr * grad
        ctx.method, ctx.syn, ctx.stored, ctx.steps = method, syn, stored, steps
        ctx.save_for_backward(images, syn_lr, targets)
        return params

    @staticmethod
    def backward(ctx, lam):
        images, syn_lr, targets = ctx.saved_tensors
        method, syn = ctx.method, ctx.syn
        want_x, want_lr, want_y = ctx.needs_input_grad[3:6]
        lr = syn_lr.detach()
        x_all = images.detach().requires_grad_(want_x)
        y_all = targets.detach().requires_grad_(want_y)
        grad_x = torch.zeros_like(x_all) if want_x else None
        grad_y = torch.zeros_like(y_all) if want_y else None
        grad_lr = torch.zeros_like(lr)
        lam = lam.detach()
        first_order = method.options.tesla_grad == "first_order"  # lam stays lam_N (no H_t lam)
        for t in range(len(ctx.stored) - 1, -1, -1):
            index, drawn = ctx.steps[t]
            with torch.enable_grad():
                w = ctx.stored[t].clone().requires_grad_(True)
                batch = x_all[index]
                if drawn is not None:
                    batch = augment.apply_diffaug(batch, drawn)
                loss = method.student_loss(w, syn, index, batch, y_all[index])
                grad = torch.autograd.grad(loss, w, create_graph=True)[0]
                inputs = ([] if first_order else [w]) + ([x_all] if want_x else []) + ([y_all] if want_y else [])
                products = (torch.autograd.grad(grad, inputs, grad_outputs=lam, allow_unused=True)
                            if inputs else ())
            grad_lr -= (grad.detach() * lam).sum()
            rest = list(products if first_order else products[1:])
            if want_x:
                part = rest.pop(0)
                if part is not None:
                    grad_x -= lr * part
            if want_y:
                part = rest.pop(0)
                if part is not None:
                    grad_y -= lr * part
            if not first_order:
                lam = lam - lr * products[0]
            ctx.stored[t] = None  # w_t is no longer needed
        return None, None, None, grad_x, grad_lr if want_lr else None, grad_y


def unroll(method, syn, start: torch.Tensor) -> torch.Tensor:
    """The student's final parameters after ``syn_steps`` steps, as :meth:`methods.mtt.MTT.unroll`
    returns them, but with a graph of constant size: back-propagating through the result runs the
    backward sweep (module docstring) into ``syn.images``, ``syn.syn_lr`` and, through
    ``method.unroll_targets(syn)``, DATM's ``syn.label_logits``; exact or first-order as
    ``method.options.tesla_grad`` says. Same minibatches and DiffAugment
    draws as the unrolled student, from the same generator.

    Args:
        method: an MTT / DATM / PAD instance (``options`` with ``syn_steps`` and ``tesla_grad``, ``next_batch``, ``student_loss``,
            ``unroll_targets``, ``dsa_strategy``, ``generator``, ``addons``).
        syn: the synthetic set (images (N, C, H, W), learnable ``syn_lr``).
        start: (P,) the expert's flat parameters at the start epoch.

    Returns:
        (P,) flat parameters w_N with a graph to the images, step size and soft labels.

    Raises:
        utils.UserError: an attached add-on changes the student's step loss (feature labels),
            which this sweep does not differentiate.
    """
    for addon in method.addons:
        if UNROLL_LOSS in addon.hooks:  # it declares that it changes the student's step loss
            raise utils.UserError(f"--tesla does not support the {addon.name} add-on (it changes the student's "
                                  f"step loss); run without --tesla")
    return _Sweep.apply(method, syn, start, syn.images, syn.syn_lr, method.unroll_targets(syn))


def teacher_soft_labels(student, net: torch.nn.Module, target: torch.Tensor, images: torch.Tensor,
                        chunk: int = 256) -> torch.Tensor:
    """TESLA's ``--teacher_label`` targets: the expert at the target epoch labels the images.

    ``softmax(f(x; w*))`` over classes, with ``f`` the student network in eval mode at the target
    parameters ``w*`` (no gradient), in chunks of ``chunk`` images; the network is put back in
    train mode. Source: justincui03/tesla ``distill.py`` (the ``args.teacher_label`` block: a
    network in eval mode with ``flat_param`` the target parameters, then a softmax), drawn afresh
    every iteration from that iteration's expert and target epoch.

    Args:
        student: a :class:`methods.mtt.FlatModel` calling ``net`` with flat parameters.
        net: the network behind ``student`` (switched to eval mode while labelling).
        target: (P,) the expert's flat parameters at ``start_epoch + expert_epochs``.
        images: (N, C, H, W) synthetic images (detached here).

    Returns:
        (N, K) class probabilities, detached.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([student(target, part) for part in images.detach().split(chunk)])
    finally:
        net.train(was_training)
    return torch.softmax(logits, dim=1)
