"""Network zoo for dataset distillation, behind a name registry.

Re-implements the evaluation networks of the dataset-condensation literature
(``networks.py`` of VICO-UoE/DatasetCondensation, copied unchanged by
GeorgeCazenavette/mtt-distillation, DATM and PAD): the ConvNet family and its
width / depth / activation / norm / pooling ablations, MLP, LeNet, AlexNet(BN),
VGG11(BN) and ResNet18(BN)(_AP). Parameter counts match the references for every
input size the references support.

Differences from the references, all deliberate:

* Names are looked up in a registry (:data:`NETWORKS`, :func:`register_network`,
  :func:`create_network`) instead of ``get_network``'s 31-branch ``if/elif``; an
  unknown name raises ``KeyError`` listing the valid ones instead of ``exit()``.
* :func:`get_network` never reseeds (the references call
  ``torch.random.manual_seed(int(time.time() * 1000) % 100000)``): seed once in
  the caller. It never wraps in ``DataParallel`` and moves to ``device`` only
  when asked.
* Spatial sizes are computed from ``im_size`` (the true input size) instead of
  hard-coded: the reference's ``im_size == 28 -> 32`` rule for ConvNet, the fixed
  ``16*5*5``/``192*4*4``/``512`` classifier widths of LeNet/AlexNet/VGG/ResNet and
  MLP's ``784 if channel == 1 else 3072`` all give the same numbers on every
  input the references accept, and sensible ones (instead of a crash) elsewhere.
* Every network is a :class:`BaseNetwork`: ``forward(x) == classifier(embed(x))``,
  and :meth:`BaseNetwork.feature_maps` exposes the per-stage activations used by
  attention / feature-matching methods (DataDAM, CAFE).
* DC's ``Swish`` (``x * sigmoid(x)``) is ``nn.SiLU``, the same function.

Every factory in the registry is called as
``factory(channel=..., num_classes=..., im_size=(H, W))``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NETWORKS",
    "EVAL_POOLS",
    "FAMILY_POOLS",
    "CONVNET_DEFAULTS",
    "register_network",
    "list_networks",
    "create_network",
    "get_network",
    "get_eval_pool",
    "BaseNetwork",
    "ConvNet",
    "MLP",
    "LeNet",
    "AlexNet",
    "VGG",
    "BasicBlock",
    "ResNet",
]

NetworkFactory = Callable[..., nn.Module]

#: Name -> factory. Factories take ``channel``, ``num_classes`` and ``im_size``
#: as keyword arguments and return a :class:`BaseNetwork`. Filled at import time
#: in registration order.
NETWORKS: dict[str, NetworkFactory] = {}


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator registering a network factory under ``name`` in :data:`NETWORKS`.

    Usage: ``@register_network("MyNet")`` on a function or class taking
    ``(channel, num_classes, im_size)``, or ``register_network("X")(partial(...))``.

    Args:
        name: Registry key (the ``--model`` value on the command line).

    Returns:
        A decorator that stores the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered (raised when the decorator is
            applied).

    Source: registry pattern of timm ``_registry.py`` / torchdistill, replacing DC
    ``utils.get_network``'s ``if/elif`` chain.
    """

    def decorator(factory: NetworkFactory) -> NetworkFactory:
        if name in NETWORKS:
            raise ValueError(f"network {name!r} is already registered")
        NETWORKS[name] = factory
        return factory

    return decorator


def list_networks() -> list[str]:
    """Return the registered network names, in registration order.

    Returns:
        A new list of names (ConvNet family first, then MLP, LeNet, AlexNet, VGG,
        ResNet).
    """
    return list(NETWORKS)


def _as_hw(im_size: Sequence[int]) -> tuple[int, int]:
    """Validate and normalise an image size to ``(H, W)``.

    Raises:
        ValueError: If ``im_size`` is not two positive integers.
    """
    hw = tuple(int(s) for s in im_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"im_size must be (H, W) with positive sizes, got {tuple(im_size)!r}")
    return hw[0], hw[1]


def create_network(
    name: str,
    channel: int,
    num_classes: int,
    im_size: Sequence[int] = (32, 32),
) -> nn.Module:
    """Build a registered network with PyTorch's default initialisation.

    Uses (and never reseeds) the global torch RNG; parameters are created on the
    current default device (CPU unless changed).

    Args:
        name: A key of :data:`NETWORKS` (e.g. ``"ConvNet"``, ``"ResNet18BN"``).
        channel: Input channels C.
        num_classes: Number of classes K (output logits).
        im_size: Input spatial size ``(H, W)``; inputs must be ``(N, C, H, W)``.

    Returns:
        The network; ``net(x)`` maps ``(N, C, H, W)`` to ``(N, K)``.

    Raises:
        KeyError: If ``name`` is not registered; the message lists valid names.
        ValueError: If ``im_size`` is malformed or too small for the network.
    """
    try:
        factory = NETWORKS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from: {', '.join(NETWORKS)}") from None
    return factory(channel=channel, num_classes=num_classes, im_size=_as_hw(im_size))


def get_network(
    model: str,
    channel: int,
    num_classes: int,
    im_size: Sequence[int] = (32, 32),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Reference-compatible network constructor (DC / MTT ``utils.get_network``).

    Same arguments as the reference plus ``device``. Unlike the reference it does
    NOT reseed the torch RNG from the clock (seed once in the caller, so two runs
    with the same seed build identical networks) and never wraps the network in
    ``DataParallel``.

    Args:
        model: Registered network name, see :func:`list_networks`.
        channel: Input channels C.
        num_classes: Number of classes K.
        im_size: Input spatial size ``(H, W)``.
        device: If given, the network is moved there (``net.to(device)``).

    Returns:
        The network, mapping ``(N, C, H, W)`` to logits ``(N, K)``.

    Raises:
        KeyError: If ``model`` is not registered (message lists valid names).
        ValueError: If ``im_size`` is malformed or too small for the network.
    """
    net = create_network(model, channel, num_classes, im_size)
    if device is not None:
        net = net.to(device)
    return net


# ---------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------


class BaseNetwork(nn.Module):
    """Common interface of every network in the zoo.

    Subclasses implement :meth:`_features` once; :meth:`forward`, :meth:`embed`,
    :meth:`feature_maps` and :meth:`embed_with_feature_maps` all run that single
    code path, so ``net.classifier(net.embed(x))`` equals ``net(x)`` exactly.

    Attributes:
        classifier: The final ``nn.Linear(D, K)``.
    """

    classifier: nn.Linear

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        """Run the network up to the classifier.

        Args:
            x: Input ``(N, C, H, W)``.
            maps: If not ``None``, each stage's activation is appended to it.

        Returns:
            Flattened features ``(N, D)``.
        """
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """D, the width of :meth:`embed`'s output (``classifier.in_features``)."""
        return self.classifier.in_features

    def forward(self, x: Tensor) -> Tensor:
        """Logits.

        Args:
            x: Images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, K)``, equal to ``self.classifier(self.embed(x))``.
        """
        return self.classifier(self._features(x, None))

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features right before the classifier (used by DM, CAFE).

        Args:
            x: Images ``(N, C, H, W)``.

        Returns:
            Features ``(N, D)`` with ``D == self.classifier.in_features``.
        """
        return self._features(x, None)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """Intermediate activations, one per stage, in forward order.

        The tensors are part of the autograd graph (gradients flow back to ``x``)
        and are never modified in place after being returned.

        Args:
            x: Images ``(N, C, H, W)``.

        Returns:
            Non-empty list of ``(N, C_i, H_i, W_i)`` tensors (``(N, D_i)`` for MLP).
            See each subclass for what a stage is.
        """
        maps: list[Tensor] = []
        self._features(x, maps)
        return maps

    def embed_with_feature_maps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`embed` and :meth:`feature_maps` from a single forward pass.

        Args:
            x: Images ``(N, C, H, W)``.

        Returns:
            ``(embedding (N, D), feature maps)``.
        """
        maps: list[Tensor] = []
        out = self._features(x, maps)
        return out, maps


def _check_spatial(h: int, w: int, net: str, im_size: tuple[int, int]) -> None:
    """Raise ValueError when a network has shrunk the input below 1x1."""
    if h < 1 or w < 1:
        raise ValueError(f"im_size {im_size} is too small for {net}: feature map would be {h}x{w}")


# ---------------------------------------------------------------------------
# ConvNet family
# ---------------------------------------------------------------------------

#: Default ConvNet setting (DC ``get_default_convnet_setting``).
CONVNET_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "net_width": 128,
        "net_depth": 3,
        "net_act": "relu",
        "net_norm": "instancenorm",
        "net_pooling": "avgpooling",
    }
)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": functools.partial(nn.ReLU, inplace=True),
    "sigmoid": nn.Sigmoid,
    "leakyrelu": functools.partial(nn.LeakyReLU, negative_slope=0.01),
    "swish": nn.SiLU,  # DC's Swish: x * sigmoid(x)
}

# (channels, height, width) -> norm layer; "instancenorm" is GroupNorm(C, C) as in DC.
_NORMS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "batchnorm": lambda c, h, w: nn.BatchNorm2d(c, affine=True),
    "layernorm": lambda c, h, w: nn.LayerNorm([c, h, w], elementwise_affine=True),
    "instancenorm": lambda c, h, w: nn.GroupNorm(c, c, affine=True),
    "groupnorm": lambda c, h, w: nn.GroupNorm(4, c, affine=True),
    "none": lambda c, h, w: nn.Identity(),
}

_POOLINGS: dict[str, Callable[[], nn.Module] | None] = {
    "avgpooling": functools.partial(nn.AvgPool2d, kernel_size=2, stride=2),
    "maxpooling": functools.partial(nn.MaxPool2d, kernel_size=2, stride=2),
    "none": None,
}


def _pick(table: dict[str, Any], key: str, what: str) -> Any:
    """``table[key]`` or a ValueError listing the valid keys."""
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; choose from: {', '.join(table)}")
    return table[key]


class _ConvBlock(nn.Module):
    """conv3x3 -> norm -> activation, then an optional 2x2 pool (ConvNet stage)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.act = act
        self.pool = pool


class ConvNet(BaseNetwork):
    """The ConvNet of dataset condensation: ``depth x [conv3x3 - norm - act - pool]`` + Linear.

    Each block: ``Conv2d(in, width, 3, padding=1)`` (padding 3 for the first conv
    on 1-channel input, so MNIST 28x28 becomes 32x32), a norm, an activation and
    a 2x2/stride-2 pool. Then flatten and ``Linear(width*h*w, K)``. With the
    defaults on 28x28 or 32x32 input the embedding has D = 128*4*4 = 2048.

    Source: Zhao et al., "Dataset Condensation with Gradient Matching" (ICLR 2021),
    VICO-UoE/DatasetCondensation ``networks.py::ConvNet`` (after Gidaris & Komodakis
    2018); MTT's ConvNetD5-D8, W512, W1024, KIP variants.

    Args:
        channel: Input channels C.
        num_classes: Number of classes K.
        net_width: Channels of every conv.
        net_depth: Number of blocks.
        net_act: ``"relu"`` (in place), ``"sigmoid"``, ``"leakyrelu"`` (slope 0.01)
            or ``"swish"``.
        net_norm: ``"instancenorm"`` (GroupNorm(C, C)), ``"batchnorm"``,
            ``"layernorm"`` (LayerNorm([C, H, W]) at the pre-pool resolution),
            ``"groupnorm"`` (GroupNorm(4, C)) or ``"none"``.
        net_pooling: ``"avgpooling"``, ``"maxpooling"`` or ``"none"``.
        im_size: Input spatial size ``(H, W)`` (the real input size; no 28->32 rule
            is needed, the first conv's padding is accounted for).
        grey_padding: pad the first conv by 3 on 1-channel input (DC's 28 -> 32);
            ``False``: padding 1 everywhere (yolky/RFAD ``models.py::ConvNet_wide``).

    Attributes:
        blocks: ``nn.ModuleList`` of blocks with ``conv``, ``norm``, ``act``, ``pool``
            (``nn.Identity`` where a part is disabled).
        feature_shape: ``(width, h, w)`` of the last block's (pooled) output.
        classifier: ``nn.Linear(width*h*w, K)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, width*h*w)``;
        ``feature_maps``: ``net_depth`` tensors, each block's activation output
        BEFORE its pool, ``(N, width, H_d, W_d)``.

    Raises:
        ValueError: Unknown ``net_act``/``net_norm``/``net_pooling``, or an input too
            small for ``net_depth`` pooled blocks.
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        net_width: int = 128,
        net_depth: int = 3,
        net_act: str = "relu",
        net_norm: str = "instancenorm",
        net_pooling: str = "avgpooling",
        im_size: Sequence[int] = (32, 32),
        grey_padding: bool = True,
    ) -> None:
        super().__init__()
        make_act = _pick(_ACTIVATIONS, net_act, "activation")
        make_norm = _pick(_NORMS, net_norm, "norm")
        make_pool = _pick(_POOLINGS, net_pooling, "pooling")
        if net_depth < 1:
            raise ValueError(f"net_depth must be >= 1, got {net_depth}")
        hw = _as_hw(im_size)
        h, w = hw
        blocks = []
        in_channels = channel
        for depth in range(net_depth):
            padding = 3 if grey_padding and channel == 1 and depth == 0 else 1
            h, w = h + 2 * padding - 2, w + 2 * padding - 2
            conv = nn.Conv2d(in_channels, net_width, kernel_size=3, padding=padding)
            norm = make_norm(net_width, h, w)
            if make_pool is None:
                pool: nn.Module = nn.Identity()
            else:
                pool = make_pool()
                h, w = h // 2, w // 2
                _check_spatial(h, w, f"ConvNet of depth {net_depth}", hw)
            blocks.append(_ConvBlock(conv, norm, make_act(), pool))
            in_channels = net_width
        self.blocks = nn.ModuleList(blocks)
        self.feature_shape: tuple[int, int, int] = (net_width, h, w)
        self.classifier = nn.Linear(net_width * h * w, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = x
        for block in self.blocks:
            out = block.act(block.norm(block.conv(out)))
            if maps is not None:
                maps.append(out)
            out = block.pool(out)
        return torch.flatten(out, 1)


def _register_convnet_family() -> None:
    """Register ConvNet and all its named variants (DC + MTT ``get_network``)."""
    variants: dict[str, dict[str, Any]] = {"ConvNet": {}}
    variants.update({f"ConvNetD{d}": {"net_depth": d} for d in range(1, 9)})
    variants.update({f"ConvNetW{w}": {"net_width": w} for w in (32, 64, 128, 256, 512, 1024)})
    variants["ConvNetKIP"] = {"net_width": 1024, "net_norm": "none"}
    # RFAD's random-feature network (yolky/RFAD ConvNet_wide, k=2): width 256, no norm, no 28->32 padding.
    variants["ConvNetRFAD"] = {"net_width": 256, "net_norm": "none", "grey_padding": False}
    variants.update(
        {
            "ConvNetAS": {"net_act": "sigmoid"},
            "ConvNetAR": {"net_act": "relu"},
            "ConvNetAL": {"net_act": "leakyrelu"},
            "ConvNetASwish": {"net_act": "swish"},
            "ConvNetASwishBN": {"net_act": "swish", "net_norm": "batchnorm"},
            "ConvNetNN": {"net_norm": "none"},
            "ConvNetBN": {"net_norm": "batchnorm"},
            "ConvNetLN": {"net_norm": "layernorm"},
            "ConvNetIN": {"net_norm": "instancenorm"},
            "ConvNetGN": {"net_norm": "groupnorm"},
            "ConvNetNP": {"net_pooling": "none"},
            "ConvNetMP": {"net_pooling": "maxpooling"},
            "ConvNetAP": {"net_pooling": "avgpooling"},
        }
    )
    for name, overrides in variants.items():
        register_network(name)(functools.partial(ConvNet, **{**CONVNET_DEFAULTS, **overrides}))


_register_convnet_family()


# ---------------------------------------------------------------------------
# MLP, LeNet, AlexNet
# ---------------------------------------------------------------------------


class MLP(BaseNetwork):
    """Three-layer perceptron: ``Linear(C*H*W, 128)-ReLU-Linear(128, 128)-ReLU-Linear(128, K)``.

    Source: DC ``networks.py::MLP`` (its input width is ``784 if channel == 1 else
    3072``, i.e. C*H*W for MNIST and CIFAR; here it is C*H*W in general).

    Args:
        channel: Input channels C.
        num_classes: Number of classes K.
        im_size: Input spatial size ``(H, W)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, 128)`` (second
        hidden layer); ``feature_maps``: the two hidden activations, ``(N, 128)`` each.
    """

    def __init__(self, channel: int, num_classes: int, im_size: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        h, w = _as_hw(im_size)
        self.fc_1 = nn.Linear(channel * h * w, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.classifier = nn.Linear(128, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = torch.flatten(x, 1)
        for layer in (self.fc_1, self.fc_2):
            out = F.relu(layer(out))
            if maps is not None:
                maps.append(out)
        return out


class LeNet(BaseNetwork):
    """LeNet-5: two conv-ReLU-maxpool stages and FC ``400-120-84-K``.

    ``conv(C->6, k5, padding 2 if C == 1 else 0)-ReLU-maxpool2``,
    ``conv(6->16, k5)-ReLU-maxpool2``, then ``Linear(16*h*w, 120)-ReLU-Linear(120, 84)-ReLU``
    and the classifier ``Linear(84, K)``. On MNIST/CIFAR, 16*h*w = 400.

    Source: DC ``networks.py::LeNet`` (LeCun et al. 1998).

    Args:
        channel: Input channels C.
        num_classes: Number of classes K.
        im_size: Input spatial size ``(H, W)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, 84)``;
        ``feature_maps``: the two post-ReLU conv outputs (before pooling),
        ``(N, 6, H1, W1)`` and ``(N, 16, H2, W2)``.

    Raises:
        ValueError: If ``im_size`` is too small.
    """

    def __init__(self, channel: int, num_classes: int, im_size: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        hw = _as_hw(im_size)
        padding = 2 if channel == 1 else 0
        h, w = (s + 2 * padding - 4 for s in hw)
        h, w = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        _check_spatial(h, w, "LeNet", hw)
        self.conv_1 = nn.Conv2d(channel, 6, kernel_size=5, padding=padding)
        self.conv_2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc_1 = nn.Linear(16 * h * w, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = x
        for conv in (self.conv_1, self.conv_2):
            out = F.relu(conv(out))
            if maps is not None:
                maps.append(out)
            out = self.pool(out)
        out = F.relu(self.fc_1(torch.flatten(out, 1)))
        return F.relu(self.fc_2(out))


class AlexNet(BaseNetwork):
    """The small AlexNet of DC: five convs, three max-pools, one Linear.

    ``conv(C->128, k5, padding 4 if C == 1 else 2)-[BN]-ReLU-maxpool``,
    ``conv(128->192, k5, p2)-[BN]-ReLU-maxpool``, ``conv(192->256, k3, p1)-[BN]-ReLU``,
    ``conv(256->192, k3, p1)-[BN]-ReLU``, ``conv(192->192, k3, p1)-[BN]-ReLU-maxpool``,
    ``Linear(192*h*w, K)`` (h = w = 4 on MNIST/CIFAR: D = 3072).

    Source: DC ``networks.py::AlexNet`` / ``AlexNetBN`` (Krizhevsky et al. 2012,
    CIFAR-sized).

    Args:
        channel: Input channels C.
        num_classes: Number of classes K.
        batchnorm: Add ``BatchNorm2d`` after each conv (AlexNetBN).
        im_size: Input spatial size ``(H, W)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, 192*h*w)``;
        ``feature_maps``: the five post-ReLU conv outputs (before pooling).

    Raises:
        ValueError: If ``im_size`` is too small.
    """

    # (out_channels, kernel, padding, max-pool after)
    _LAYERS = ((128, 5, None, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))

    def __init__(
        self,
        channel: int,
        num_classes: int,
        batchnorm: bool = False,
        im_size: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        hw = _as_hw(im_size)
        h, w = hw
        stages = []
        in_channels = channel
        for out_channels, kernel, padding, pooled in self._LAYERS:
            if padding is None:
                padding = 4 if channel == 1 else 2
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            stages.append(nn.Sequential(*layers))
            if pooled:
                h, w = h // 2, w // 2
            in_channels = out_channels
        _check_spatial(h, w, "AlexNet", hw)
        self.stages = nn.ModuleList(stages)
        self._pooled = tuple(layer[3] for layer in self._LAYERS)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(in_channels * h * w, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = x
        for stage, pooled in zip(self.stages, self._pooled):
            out = stage(out)
            if maps is not None:
                maps.append(out)
            if pooled:
                out = self.pool(out)
        return torch.flatten(out, 1)


# ---------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------

#: VGG layer configurations: ints are conv widths, "M" a 2x2 max-pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "VGG11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "VGG13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "VGG16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "VGG19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


def _channel_norm(kind: str, channels: int) -> nn.Module:
    """Per-channel norm for VGG/ResNet: ``"instancenorm"`` = GroupNorm(C, C), or ``"batchnorm"``.

    Raises:
        ValueError: For any other ``kind``.
    """
    factories = {
        "instancenorm": lambda: nn.GroupNorm(channels, channels, affine=True),
        "batchnorm": lambda: nn.BatchNorm2d(channels),
    }
    return _pick(factories, kind, "norm")()


class VGG(BaseNetwork):
    """VGG with a per-conv norm, as in DC: ``[conv3x3-norm-ReLU | maxpool]*`` then ``Linear``.

    The first conv uses padding 3 on 1-channel input (28x28 -> 32x32). DC's final
    ``AvgPool2d(1, 1)`` is the identity and is omitted. On 28x28/32x32 input the
    embedding is ``(N, 512)``.

    Source: DC ``networks.py::VGG`` (Simonyan & Zisserman 2015, via kuangliu/pytorch-cifar).

    Args:
        cfg: A key of :data:`VGG_CONFIGS` (``"VGG11"`` for the registered nets).
        channel: Input channels C.
        num_classes: Number of classes K.
        norm: ``"instancenorm"`` (GroupNorm(C, C); VGG11) or ``"batchnorm"`` (VGG11BN).
        im_size: Input spatial size ``(H, W)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, 512*h*w)``;
        ``feature_maps``: the post-ReLU output of every conv (8 for VGG11), before
        any pooling.

    Raises:
        KeyError: Unknown ``cfg``.
        ValueError: Unknown ``norm`` or ``im_size`` too small.
    """

    def __init__(
        self,
        cfg: str,
        channel: int,
        num_classes: int,
        norm: str = "instancenorm",
        im_size: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        hw = _as_hw(im_size)
        h, w = hw
        stages = []
        in_channels = channel
        for index, item in enumerate(VGG_CONFIGS[cfg]):
            if item == "M":
                stages[-1].append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
                continue
            padding = 3 if channel == 1 and index == 0 else 1
            h, w = h + 2 * padding - 2, w + 2 * padding - 2
            conv = nn.Conv2d(in_channels, int(item), kernel_size=3, padding=padding)
            stages.append(nn.ModuleList([nn.Sequential(conv, _channel_norm(norm, int(item)), nn.ReLU(inplace=True))]))
            in_channels = int(item)
        _check_spatial(h, w, cfg, hw)
        # Each stage: [conv-norm-relu] optionally followed by [maxpool].
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(in_channels * h * w, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = x
        for stage in self.stages:
            out = stage[0](out)
            if maps is not None:
                maps.append(out)
            if len(stage) > 1:
                out = stage[1](out)
        return torch.flatten(out, 1)


# ---------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1-conv shortcut when the shape changes.

    Standard (kuangliu) form: the first conv carries the stride; the shortcut is
    ``conv1x1(stride) -> norm``. ``avgpool_downsample=True`` gives DC's ``_AP`` form:
    both convs have stride 1, a 2x2 average pool follows the first conv's ReLU, and
    the shortcut is ``conv1x1 -> AvgPool2d(2) -> norm``.

    Source: DC ``networks.py::BasicBlock`` / ``BasicBlock_AP`` (He et al. 2016).

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: 1 or 2 (downsampling factor).
        norm: ``"instancenorm"`` or ``"batchnorm"``.
        avgpool_downsample: Use the ``_AP`` downsampling described above.

    Shapes:
        ``(N, in_planes, H, W) -> (N, planes, H', W')`` with ``H' = ceil(H/2)``
        (standard, stride 2), ``floor(H/2)`` (``_AP``, stride 2) or ``H`` (stride 1).
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
    ) -> None:
        super().__init__()
        conv_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _channel_norm(norm, planes)
        self.pool: nn.Module = (
            nn.AvgPool2d(kernel_size=2, stride=2) if avgpool_downsample and stride != 1 else nn.Identity()
        )
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _channel_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            projection = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=conv_stride, bias=False)]
            if avgpool_downsample:
                projection.append(nn.AvgPool2d(kernel_size=2, stride=2))
            self.shortcut = nn.Sequential(*projection, _channel_norm(norm, planes))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block. ``x``: ``(N, in_planes, H, W)``; returns ``(N, planes, H', W')``."""
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(BaseNetwork):
    """CIFAR-style ResNet (kuangliu): 3x3 stem, four stages of basic blocks, Linear.

    Stem ``conv3x3(C->64, stride 1, no bias)-norm-ReLU``; stages of widths
    64/128/256/512 with strides 1/2/2/2. Standard form ends with
    ``avg_pool2d(4)`` then ``Linear(512*h*w, K)`` (h = w = 1 on 28x28/32x32). The
    ``_AP`` form (``avgpool_downsample=True``) downsamples with average pooling
    and has no final pool (DC's ``avg_pool2d(kernel_size=1)`` is the identity), so
    the classifier is ``Linear(512*4*4, K)`` on 32x32 and ``Linear(512*3*3, K)`` on
    28x28.

    Source: DC ``networks.py::ResNet`` / ``ResNet_AP`` (He et al. 2016,
    kuangliu/pytorch-cifar).

    Args:
        channel: Input channels C.
        num_classes: Number of classes K.
        num_blocks: Blocks per stage (``(2, 2, 2, 2)`` = ResNet18).
        norm: ``"instancenorm"`` (GroupNorm(C, C); ResNet18) or ``"batchnorm"``.
        avgpool_downsample: The ``_AP`` variant.
        im_size: Input spatial size ``(H, W)``.

    Shapes:
        ``forward``: ``(N, C, H, W) -> (N, K)``; ``embed``: ``-> (N, 512*h*w)``;
        ``feature_maps``: the output of each of the four stages,
        ``(N, 64|128|256|512, H_s, W_s)``.

    Raises:
        ValueError: Unknown ``norm`` or ``im_size`` too small.
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
        im_size: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        hw = _as_hw(im_size)
        h, w = hw
        self.conv1 = nn.Conv2d(channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _channel_norm(norm, 64)
        stages = []
        in_planes = 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            blocks = []
            for block_stride in [stride] + [1] * (count - 1):
                blocks.append(BasicBlock(in_planes, planes, block_stride, norm, avgpool_downsample))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            if stride == 2:
                h, w = (h // 2, w // 2) if avgpool_downsample else ((h + 1) // 2, (w + 1) // 2)
                _check_spatial(h, w, "ResNet", hw)
        self.stages = nn.ModuleList(stages)
        self.final_pool: nn.Module = nn.Identity() if avgpool_downsample else nn.AvgPool2d(kernel_size=4)
        if not avgpool_downsample:
            h, w = h // 4, w // 4
            _check_spatial(h, w, "ResNet", hw)
        self.classifier = nn.Linear(in_planes * h * w, num_classes)

    def _features(self, x: Tensor, maps: list[Tensor] | None) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            out = stage(out)
            if maps is not None:
                maps.append(out)
        return torch.flatten(self.final_pool(out), 1)


def _register_other_networks() -> None:
    """Register MLP, LeNet, AlexNet(BN), VGG11(BN), ResNet18(BN)(_AP)."""
    factories: dict[str, NetworkFactory] = {
        "MLP": MLP,
        "LeNet": LeNet,
        "AlexNet": AlexNet,
        "AlexNetBN": functools.partial(AlexNet, batchnorm=True),
        "VGG11": functools.partial(VGG, "VGG11", norm="instancenorm"),
        "VGG11BN": functools.partial(VGG, "VGG11", norm="batchnorm"),
        "ResNet18": functools.partial(ResNet, norm="instancenorm"),
        "ResNet18BN": functools.partial(ResNet, norm="batchnorm"),
        "ResNet18_AP": functools.partial(ResNet, norm="instancenorm", avgpool_downsample=True),
        "ResNet18BN_AP": functools.partial(ResNet, norm="batchnorm", avgpool_downsample=True),
    }
    for name, factory in factories.items():
        register_network(name)(factory)


_register_other_networks()


# ---------------------------------------------------------------------------
# Evaluation pools
# ---------------------------------------------------------------------------

#: Fixed cross-architecture evaluation pools of DC ``utils.get_eval_pool``.
#: "A" follows DC's latest version, which includes ConvNetASwish (MTT's copy
#: drops it); "M" is DC's (the trajectory family's is in :data:`FAMILY_POOLS`).
EVAL_POOLS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "M": ("MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"),
        "B": ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"),
        "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),
        "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),
        "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"),
        "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),
        "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),
    }
)


def _strip_bn(model: str) -> list[str]:
    """DC mode "S": the part of the name before the first "BN" (ConvNetBN -> ConvNet)."""
    return [model[: model.index("BN")]] if "BN" in model else [model]


#: Pools a family of reference repositories defines differently from DC, by family name and
#: mode: MTT's ``utils.get_eval_pool`` (GeorgeCazenavette/mtt-distillation, copied by
#: NUS-HPC-AI-Lab/DATM and PAD) has "M" = ConvNet, AlexNet, VGG11, ResNet18_AP, ResNet18.
#: Family "DC" (DatasetCondensation, DM, DataDAM, CAFE) uses :data:`EVAL_POOLS` as it is.
FAMILY_POOLS: MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]] = MappingProxyType(
    {
        "DC": MappingProxyType({}),
        "MTT": MappingProxyType({"M": ("ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18")}),
    }
)


# Pools that depend on the training model.
_MODEL_POOLS: dict[str, Callable[[str], list[str]]] = {
    "S": _strip_bn,
    "SS": lambda model: [model],
    "C": lambda model: [model, "ConvNet"],
}


def get_eval_pool(eval_mode: str, model: str, model_eval: str | None = None, family: str = "DC") -> list[str]:
    """Networks to evaluate a synthetic set on (DC / MTT ``utils.get_eval_pool``).

    Modes: ``M`` (multi-architecture), ``B`` (BatchNorm nets, DM), ``W``/``D``/``A``/
    ``P``/``N`` (ConvNet width / depth / activation / pooling / norm ablations; see
    :data:`EVAL_POOLS`), ``S`` (the training model with everything from the first
    "BN" on removed, as DC does: ConvNetBN -> ConvNet, ResNet18BN_AP -> ResNet18,
    because a tiny synthetic set cannot estimate BN statistics), ``SS`` (exactly
    the training model) and ``C`` (MTT: ``[model, "ConvNet"]``).

    Args:
        eval_mode: One of the modes above.
        model: The training (distillation) model name.
        model_eval: Accepted for signature compatibility. The reference returns
            ``[model_eval]`` for any unrecognised mode; here unknown modes raise.
        family: Whose pools: ``"DC"`` (DatasetCondensation's) or ``"MTT"`` (mtt-distillation's,
            which differs in ``M``; see :data:`FAMILY_POOLS`).

    Returns:
        A new list of registered network names.

    Raises:
        ValueError: If ``eval_mode`` or ``family`` is unknown; the message lists valid ones.
    """
    del model_eval  # see docstring: the reference's silent fallback is not kept
    if family not in FAMILY_POOLS:
        raise ValueError(f"unknown pool family {family!r}; choose from: {', '.join(FAMILY_POOLS)}")
    if eval_mode in FAMILY_POOLS[family]:
        return list(FAMILY_POOLS[family][eval_mode])
    if eval_mode in EVAL_POOLS:
        return list(EVAL_POOLS[eval_mode])
    if eval_mode in _MODEL_POOLS:
        return _MODEL_POOLS[eval_mode](model)
    valid = ", ".join([*EVAL_POOLS, *_MODEL_POOLS])
    raise ValueError(f"unknown eval_mode {eval_mode!r}; choose from: {valid}")


FLOPS_DEFINITION = ("FLOPs per image = 2 x multiply-adds of the convolution and linear layers for one image "
                    "(torch.utils.flop_counter.FlopCounterMode); normalisation, activation and pooling are not counted")


# --------------------------------------------------------------------------------------------
# Measures: parameters and FLOPs (the cost tables, original models, run cost records)
# --------------------------------------------------------------------------------------------
def count_parameters(net: nn.Module) -> int:
    """Number of parameter entries of ``net`` (every ``net.parameters()`` tensor, frozen or not;
    buffers such as BatchNorm running statistics are not counted), as docs/reference-notes.md counts them."""
    return int(sum(p.numel() for p in net.parameters()))


def flops_per_image(net: nn.Module, channel: int, im_size: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``net`` on one (C, H, W) image, counted by
    ``torch.utils.flop_counter.FlopCounterMode``.

    That counter charges 2 FLOPs per multiply-add of convolutions and matrix products (so
    multiply-adds = FLOPs / 2) and nothing for normalisation, activations or pooling
    (:data:`FLOPS_DEFINITION`). The pass runs in eval mode without gradients on the network's
    device (BatchNorm statistics do not move); the network's mode is restored afterwards.

    Args:
        net: the network.
        channel: C.
        im_size: (H, W).

    Returns:
        FLOPs per image (an int).
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    image = torch.zeros(1, int(channel), *[int(s) for s in im_size], device=device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(image)
    finally:
        net.train(was_training)
    return int(counter.get_total_flops())
