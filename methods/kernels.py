"""Kernels of infinitely wide networks and kernel ridge regression (a library; no command line).

Three pieces, used by KIP (``methods/kip.py``) and usable by any kernel method:

1. :func:`fc_kernels`: the exact infinite-width NNGP and NTK of a fully connected ReLU network,
   in closed form by the arc-cosine recursion (Cho & Saul, "Kernel Methods for Deep Learning",
   NeurIPS 2009, eq. 6 with n = 1 and n = 0; Lee et al., "Deep Neural Networks as Gaussian
   Processes", ICLR 2018, eq. 4-5; Jacot, Gabriel, Hongler, "Neural Tangent Kernel", NeurIPS 2018,
   Theorem 1). Conventions are those of neural-tangents' ``stax.Dense(W_std, b_std,
   parameterization='ntk')`` + ``stax.Relu()`` as built by ``FullyConnectedNetwork`` in
   google-research/google-research ``kip/KIP.ipynb``: ``depth`` hidden layers of
   ``Dense -> ReLU`` and a ``Dense`` read-out, ``W_std = sqrt(2)``, ``b_std = 0.1``, a layer
   ``z = W_std / sqrt(n_in) * W h + b_std * b`` with ``W, b ~ N(0, 1)``.
2. :class:`RandomConvFeatures`: a random-feature approximation of the NNGP of a ConvNet, from a
   pool of randomly initialised finite networks (Loo, Hasani, Amini, Rus, "Efficient Dataset
   Distillation using Random Feature Approximation", NeurIPS 2022, Sec. 3; reference yolky/RFAD
   ``random_features.py``, ``models.py``, ``distillation.py``).
3. :func:`kernel_ridge_regression`: ``K_ts (K_ss + reg * tr(K_ss)/n_s * I)^-1 y_s``, the trace-scaled
   ridge of KIP (Nguyen, Chen, Lee, "Dataset Meta-Learning from Kernel Ridge-Regression", ICLR 2021,
   eq. 2 and Sec. 3; ``loss_acc_fn`` in ``kip/KIP.ipynb``).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

import networks

# neural-tangents conventions of the KIP colab's FullyConnectedNetwork (and RFAD's Gaussian init).
W_STD = math.sqrt(2.0)
B_STD = 0.1
# |cos| is kept below 1 - CLAMP so that d arccos / d cos stays finite on the diagonal of K(x, x).
_CLAMP = 1e-7


def relu_expectations(cov12: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The arc-cosine kernels of ReLU: for ``(u, v)`` centred Gaussian with ``Var u = var1``,
    ``Var v = var2``, ``Cov(u, v) = cov12`` and ``theta = arccos(cov12 / sqrt(var1 var2))``:

    ``E[relu(u) relu(v)] = sqrt(var1 var2) / (2 pi) * (sin theta + (pi - theta) cos theta)``
    (Cho & Saul 2009, eq. 6, n = 1, halved for a unit-variance weight), and
    ``E[relu'(u) relu'(v)] = (pi - theta) / (2 pi)`` (the same with n = 0).

    Args:
        cov12: (N1, N2) covariances.
        var1: (N1,) variances of the rows' inputs; var2: (N2,) of the columns'.

    Returns:
        ``(E[relu relu] (N1, N2), E[relu' relu'] (N1, N2))``.
    """
    norms = torch.sqrt(var1[:, None] * var2[None, :])
    cos = (cov12 / norms).clamp(-1.0 + _CLAMP, 1.0 - _CLAMP)
    theta = torch.arccos(cos)
    value = norms / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)
    derivative = (math.pi - theta) / (2 * math.pi)
    return value, derivative


def fc_kernels(x1: torch.Tensor, x2: torch.Tensor, depth: int = 1, w_std: float = W_STD,
               b_std: float = B_STD) -> Tuple[torch.Tensor, torch.Tensor]:
    """The infinite-width NNGP and NTK of a fully connected ReLU network (module docstring, 1).

    With inputs flattened to ``d`` features, the first layer gives
    ``Sigma^1(x, x') = w_std^2 <x, x'> / d + b_std^2`` and ``Theta^1 = Sigma^1``; each of the
    ``depth`` ReLU + Dense layers then gives (:func:`relu_expectations`)

    ``Sigma^{l+1} = w_std^2 E[relu(u) relu(v)] + b_std^2``,
    ``Theta^{l+1} = Sigma^{l+1} + w_std^2 E[relu'(u) relu'(v)] Theta^l``,

    with ``(u, v) ~ N(0, Sigma^l restricted to {x, x'})``: the NNGP of one output unit (Lee et al.
    2018, eq. 4-5) and its NTK under the NTK parameterisation (Jacot et al. 2018, Theorem 1; the
    recursion of neural-tangents' ``Dense`` and ``Relu``). Both kernels are the same for every
    output unit and zero across units.

    Args:
        x1: (N1, ...) inputs (flattened); x2: (N2, ...) with the same trailing shape.
        depth: hidden layers (``DEPTH`` of the KIP colab; 0 is the linear read-out alone).
        w_std, b_std: weight and bias standard deviations (neural-tangents ``W_std``, ``b_std``).

    Returns:
        ``(nngp (N1, N2), ntk (N1, N2))`` in the dtype of ``x1`` (use float64 for KRR, as the colab's
        ``jax_enable_x64``).

    Raises:
        ValueError: ``depth < 0`` or inputs of different feature counts.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    a, b = x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inputs have {a.shape[1]} and {b.shape[1]} features")
    d = a.shape[1]
    w2, b2 = w_std ** 2, b_std ** 2
    cov = w2 * (a @ b.T) / d + b2
    var1 = w2 * (a * a).sum(1) / d + b2
    var2 = w2 * (b * b).sum(1) / d + b2
    ntk = cov
    for _ in range(depth):
        value, derivative = relu_expectations(cov, var1, var2)
        # On the diagonal theta = 0: E[relu(u)^2] = var / 2 and E[relu'(u)^2] = 1 / 2.
        var1, var2 = w2 * var1 / 2 + b2, w2 * var2 / 2 + b2
        cov = w2 * value + b2
        ntk = cov + w2 * derivative * ntk
    return cov, ntk


def fc_nngp(x1: torch.Tensor, x2: torch.Tensor, depth: int = 1, w_std: float = W_STD,
            b_std: float = B_STD) -> torch.Tensor:
    """The NNGP (N1, N2) of :func:`fc_kernels`."""
    return fc_kernels(x1, x2, depth, w_std, b_std)[0]


def fc_ntk(x1: torch.Tensor, x2: torch.Tensor, depth: int = 1, w_std: float = W_STD,
           b_std: float = B_STD) -> torch.Tensor:
    """The NTK (N1, N2) of :func:`fc_kernels`."""
    return fc_kernels(x1, x2, depth, w_std, b_std)[1]


def gaussian_init_(net: nn.Module, generator: torch.Generator, w_std: float = W_STD, b_std: float = B_STD) -> nn.Module:
    """Re-initialise every ``Conv2d`` and ``Linear`` of ``net`` in place: weights
    ``N(0, w_std^2 / fan_in)``, biases ``N(0, b_std^2)`` (RFAD ``models.py``: ``Conv2d_gaussian``,
    ``GaussianLinear``), drawn from ``generator`` on the CPU. Normalisation layers are left as they are.

    Returns:
        ``net``.
    """
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight = module.weight
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) * (w_std / math.sqrt(fan_in)))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * b_std)
    return net


class RandomConvFeatures:
    """Random features of ``n_models`` randomly initialised networks whose inner products
    approximate the network's NNGP (module docstring, 2; RFAD).

    ``features(x) = [embed_1(x), ..., embed_M(x)] / sqrt(M * D)`` (N, M*D), where ``embed_m`` is
    the penultimate (flattened) embedding ``networks.BaseNetwork.embed`` of network ``m`` under
    :func:`gaussian_init_`. Then ``F F^T`` estimates ``E[<embed(x), embed(x')>] / D``, and the
    NNGP of the Gaussian read-out layer on top is ``K = w_std^2 F F^T + b_std^2`` (:meth:`kernel`;
    RFAD ``distillation.py``: ``2 * F F^T + 0.01``). The estimate is unbiased for a finite width;
    its error falls as ``1 / sqrt(M)`` and the finite-width bias as the width grows (Loo et al.
    2022, Sec. 3).

    Args:
        model: a ``networks.py`` name (RFAD used its ConvNet without normalisation, width 256).
        n_models: M.
        channel, num_classes, im_size: the data's shape (``num_classes`` only sizes the unused
            classifier).
        device: where the networks run.
        generator: CPU generator of the initial weights.
        w_std, b_std: weight and bias standard deviations of the Gaussian initialisation and the
            read-out.

    Raises:
        KeyError: unknown ``model``.
        ValueError: ``n_models < 1``.
    """

    def __init__(self, model: str, n_models: int, *, channel: int, num_classes: int, im_size: Sequence[int],
                 device: torch.device, generator: torch.Generator, w_std: float = W_STD, b_std: float = B_STD):
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        self.w_std, self.b_std = w_std, b_std
        self.nets: List[nn.Module] = []
        for _ in range(n_models):
            net = gaussian_init_(networks.create_network(model, channel, num_classes, im_size), generator, w_std, b_std)
            net = net.to(device).eval()
            for param in net.parameters():
                param.requires_grad_(False)
            self.nets.append(net)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, M*D) scaled random features of ``images`` (N, C, H, W), with a graph to ``images``."""
        embeds = [net.embed(images) for net in self.nets]
        width = sum(embed.shape[1] for embed in embeds)
        return torch.cat(embeds, dim=1) / math.sqrt(width)

    def kernel_from_features(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """``w_std^2 f1 f2^T + b_std^2`` (N1, N2), in float64."""
        return self.w_std ** 2 * (f1.double() @ f2.double().T) + self.b_std ** 2

    def kernel(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The approximate NNGP (N1, N2) of images ``x1`` (N1, C, H, W) and ``x2`` (N2, C, H, W), float64."""
        return self.kernel_from_features(self.features(x1), self.features(x2))


def kernel_ridge_regression(k_ts: torch.Tensor, k_ss: torch.Tensor, y_s: torch.Tensor, reg: float) -> torch.Tensor:
    """Kernel ridge regression predictions with KIP's trace-scaled ridge:

    ``pred = K_ts (K_ss + reg * tr(K_ss) / n_s * I)^-1 y_s``

    (Nguyen, Chen, Lee, ICLR 2021, eq. 2; ``k_ss_reg`` in google-research ``kip/KIP.ipynb``). Solved
    with ``torch.linalg.solve`` (differentiable in every argument); ``reg = 0`` is the plain
    interpolating solve.

    Args:
        k_ts: (n_t, n_s) kernel between targets and support.
        k_ss: (n_s, n_s) kernel of the support (symmetric positive semi-definite).
        y_s: (n_s, K) support labels.
        reg: the ridge, relative to the mean eigenvalue ``tr(K_ss) / n_s``.

    Returns:
        (n_t, K) predictions, in the dtype of the kernels.

    Raises:
        ValueError: shapes that do not fit, or ``reg < 0``.
        torch.linalg.LinAlgError: ``K_ss + ridge`` is singular (``reg = 0`` with repeated support points).
    """
    n_s = k_ss.shape[0]
    if k_ss.shape != (n_s, n_s) or k_ts.shape[1] != n_s or y_s.shape[0] != n_s:
        raise ValueError(f"kernel ridge regression: K_ts {tuple(k_ts.shape)}, K_ss {tuple(k_ss.shape)}, "
                         f"y_s {tuple(y_s.shape)} do not fit")
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    ridge = reg * torch.trace(k_ss) / n_s
    eye = torch.eye(n_s, dtype=k_ss.dtype, device=k_ss.device)
    return k_ts @ torch.linalg.solve(k_ss + ridge * eye, y_s.to(k_ss.dtype))
