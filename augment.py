"""Differentiable Siamese Augmentation (DSA / DiffAugment) and DC's non-differentiable augmentation.

Two augmentation families live here:

* **DSA** (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021;
  ``DiffAugment``/``ParamDiffAug`` in VICO-UoE/DatasetCondensation ``utils.py``, copied by mtt-distillation).
  Six operations (``AUGMENT_OPS``): ``color`` (brightness, then saturation, then contrast), ``crop``
  (translation), ``cutout``, ``flip``, ``scale`` and ``rotate``. As in the reference's mode ``'S'``, every
  call picks ONE operation uniformly from the strategy string and applies it, with per-sample random
  parameters in ordinary training and one shared parameter set in Siamese mode.
* **DC augmentation** (``augment``/``get_daparam`` in DC ``utils.py``), used to train evaluation networks
  when DSA is off: per image one of crop / scale / rotate / noise.

Design:

* Sampling is separated from application. :func:`sample_diffaug_params` returns a :class:`DiffAugParams`
  holding the drawn transform parameters; :func:`apply_diffaug` applies them differentiably. Siamese
  augmentation is "sample once, apply to the real and to the synthetic batch"; the reference's global
  ``torch.manual_seed`` re-seeding (``set_seed_DiffAug``) is not reproduced.
* Randomness comes only from an explicit ``torch.Generator`` (normally a CPU generator derived from the
  run seed). The small parameter tensors are drawn on the generator's device and then moved to the
  images' device, so a CPU generator gives the same transforms on CPU and CUDA. ``generator=None``
  draws from the global torch RNG like any ordinary torch op; toolkit code always passes a generator.
  Nothing in this module calls ``torch.manual_seed`` or otherwise touches the global RNG state.

Reference facts kept, and decisions taken where the references are silent or version-dependent:

* ``affine_grid``/``grid_sample`` use ``align_corners=True``. DC pins torch 1.2, whose (only) behaviour
  equals ``align_corners=True``; mtt-distillation passes ``align_corners=True`` explicitly.
* Non-square images (H != W): crop shifts and cutout sides are computed per axis (as the reference
  does); ``rotate`` corrects its affine matrix for the aspect ratio so that it is a true pixel-space
  rotation (identical to the reference for square images, where the reference's normalised-coordinate
  rotation would otherwise shear).
* DC ``rotate`` uses a bilinear torch rotation instead of scipy's cubic-spline ``rotate`` so that it runs on
  the images' device; the angle convention (positive = counter-clockwise on screen), integer angles and the
  fill value are those of the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ParamDiffAug",
    "DiffAugParams",
    "AugmentOp",
    "AUGMENT_OPS",
    "validate_strategy",
    "sample_diffaug_params",
    "apply_diffaug",
    "diff_augment",
    "siamese_augment",
    "DCAugParam",
    "DCAugDraws",
    "DC_AUGMENT_OPS",
    "validate_dc_strategy",
    "get_daparam",
    "sample_dc_augment",
    "concat_dc_draws",
    "apply_dc_augment",
    "dc_augment",
]

_IDENTITY_NAMES = ("", "none")


# ---------------------------------------------------------------------------------------------------------
# Random draws (explicit generator; never the global RNG unless generator is None)
# ---------------------------------------------------------------------------------------------------------


def _draw_device(generator: Optional[torch.Generator]) -> torch.device:
    """Device on which random numbers are drawn: the generator's, or CPU for the global RNG."""
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """``n`` float32 samples of U(0, 1) drawn with ``generator``; shape (n,)."""
    return torch.rand(n, generator=generator, device=_draw_device(generator))


def _randint(low: int, high: int, n: int, generator: Optional[torch.Generator]) -> Tensor:
    """``n`` int64 samples uniform in ``{low, ..., high - 1}``; shape (n,)."""
    return torch.randint(low, high, (n,), generator=generator, device=_draw_device(generator))


def _check_images(x: Tensor, name: str = "x") -> None:
    """Raise ValueError unless ``x`` is a 4-D (N, C, H, W) tensor."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an (N, C, H, W) tensor, got {shape}")


def _rotation_theta(angle: Tensor, height: int, width: int) -> Tensor:
    """Affine matrices (for ``affine_grid``, align_corners=True) rotating about the image centre.

    The reference uses ``[[cos, -sin, 0], [sin, cos, 0]]`` in normalised coordinates, which is a true
    rotation only for square images. The off-diagonal terms are rescaled by the pixel extents so the
    rotation is exact in pixel space; for H == W this is exactly the reference matrix.

    Args:
        angle: (N,) angles in radians; positive turns the content counter-clockwise on screen.
        height: image height H.
        width: image width W.

    Returns:
        (N, 2, 3) affine matrices with the dtype and device of ``angle``.
    """
    half_h = max(height - 1, 1) / 2.0
    half_w = max(width - 1, 1) / 2.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    row_x = torch.stack([cos, -sin * (half_h / half_w), zero], dim=-1)
    row_y = torch.stack([sin * (half_w / half_h), cos, zero], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp ``x`` (N, C, H, W) with (N or 1, 2, 3) ``theta``: bilinear, zero padding, align_corners=True."""
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _shift_gather(x: Tensor, row_offset: Tensor, col_offset: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample integer translation by index arithmetic (no loop over samples).

    ``out[n, c, i, j] = x[n, c, i + row_offset[n], j + col_offset[n]]`` where that index is inside the
    image. Outside indices are clamped for the gather; the caller fills them using the returned mask.

    Args:
        x: (N, C, H, W) images.
        row_offset: (N,) or (1,) int64 offsets along H, on ``x.device``.
        col_offset: (N,) or (1,) int64 offsets along W, on ``x.device``.

    Returns:
        ``(gathered, valid)``: gathered (N, C, H, W) values and a (N, 1, H, W) bool mask that is True where
        the source index was inside the image.
    """
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).unsqueeze(0) + row_offset.view(-1, 1)  # (N|1, H)
    cols = torch.arange(w, device=x.device).unsqueeze(0) + col_offset.view(-1, 1)  # (N|1, W)
    valid = ((rows >= 0) & (rows < h)).unsqueeze(-1) & ((cols >= 0) & (cols < w)).unsqueeze(-2)
    flat = rows.clamp(0, h - 1).unsqueeze(-1) * w + cols.clamp(0, w - 1).unsqueeze(-2)  # (N|1, H, W)
    flat = flat.expand(n, h, w).reshape(n, 1, h * w).expand(n, c, h * w)
    gathered = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return gathered, valid.expand(n, h, w).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------
# DSA parameters and operations
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamDiffAug:
    """Hyper-parameters of DSA (values of DC ``utils.ParamDiffAug``).

    Attributes:
        aug_mode: ``'S'`` applies one operation, chosen uniformly, per call (the only mode any reference
            method uses; the reference's unused mode ``'M'`` is not implemented).
        prob_flip: probability of a horizontal flip.
        ratio_scale: scale factors are drawn from U(1 / ratio_scale, ratio_scale) per axis.
        ratio_rotate: rotation angles are drawn from U(-ratio_rotate, ratio_rotate) degrees.
        ratio_crop_pad: maximal translation as a fraction of the image side.
        ratio_cutout: cutout square side as a fraction of the image side.
        brightness: brightness offset ``(r - 0.5) * brightness``.
        saturation: saturation factor ``r * saturation``.
        contrast: contrast factor ``r + contrast``.

    The reference also defines ``ratio_noise`` (0.05), which no operation reads; it is omitted.
    """

    aug_mode: str = "S"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass(frozen=True, eq=False)
class DiffAugParams:
    """One drawn DSA transform: the chosen operation and its parameters.

    Produced by :func:`sample_diffaug_params`, consumed by :func:`apply_diffaug`. Every tensor in
    ``values`` has a leading dimension of ``batch_size`` (per-sample parameters) or of 1 when ``siamese``
    (one parameter set broadcast to a batch of any size). Tests and callers may build one by hand to
    force a transform, e.g. ``DiffAugParams('flip', {'flip': torch.tensor([True])}, (32, 32), True, 1)``.

    Attributes:
        op: name of the operation in ``AUGMENT_OPS``, or ``None`` for the identity.
        values: parameter tensors (usually on CPU); see each op's sampler for the keys.
        image_size: (H, W) the parameters were drawn for.
        siamese: whether one parameter set is shared by the whole batch.
        batch_size: number of per-sample parameter sets (only enforced when not ``siamese``).
    """

    op: Optional[str]
    values: dict[str, Tensor] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    siamese: bool = False
    batch_size: int = 0


@dataclass(frozen=True)
class AugmentOp:
    """A DSA operation split into its random part and its deterministic, differentiable part.

    Attributes:
        name: the operation's strategy-string name.
        sample: ``sample(num_sets, (H, W), generator, param) -> dict[str, Tensor]`` drawing ``num_sets``
            parameter sets on the generator's device.
        apply: ``apply(x, values) -> Tensor`` mapping (N, C, H, W) to (N, C, H, W); ``values`` are already
            on ``x.device`` and have a leading dimension of N or 1.
    """

    name: str
    sample: Callable[[int, tuple[int, int], Optional[torch.Generator], ParamDiffAug], dict[str, Tensor]]
    apply: Callable[[Tensor, dict[str, Tensor]], Tensor]


def _sample_color(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """Brightness offset, saturation factor and contrast factor, drawn in that order (reference order)."""
    return {
        "brightness": (_uniform(n, gen) - 0.5) * p.brightness,
        "saturation": _uniform(n, gen) * p.saturation,
        "contrast": _uniform(n, gen) + p.contrast,
    }


def _apply_color(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Brightness ``x + b``; saturation ``(x - mean_C) * s + mean_C``; contrast ``(x - mean_CHW) * c + mean_CHW``."""
    x = x + v["brightness"].view(-1, 1, 1, 1)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * v["saturation"].view(-1, 1, 1, 1) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * v["contrast"].view(-1, 1, 1, 1) + image_mean


def _sample_crop(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """Integer shifts ``tx`` (along H) and ``ty`` (along W) in ``[-shift, shift]``, shift = int(side * ratio + 0.5)."""
    shift_h = int(size[0] * p.ratio_crop_pad + 0.5)
    shift_w = int(size[1] * p.ratio_crop_pad + 0.5)
    return {"tx": _randint(-shift_h, shift_h + 1, n, gen), "ty": _randint(-shift_w, shift_w + 1, n, gen)}


def _apply_crop(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Translation: ``out[i, j] = x[i + tx, j + ty]`` inside the image, 0 where the source is outside.

    Equals the reference's gather from a 1-px zero-padded image with clamped indices.
    """
    gathered, valid = _shift_gather(x, v["tx"], v["ty"])
    return gathered * valid.to(x.dtype)


def _sample_cutout(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """Cutout rectangle: side = int(side * ratio + 0.5) per axis; centre offset as in the reference.

    The centre offset is uniform in ``{0, ..., side_img - (cut_side mod 2)}`` and the rectangle starts
    at ``offset - cut_side // 2``; the stored ``top``/``left`` may be negative (the rectangle is clipped).
    """
    cut_h = int(size[0] * p.ratio_cutout + 0.5)
    cut_w = int(size[1] * p.ratio_cutout + 0.5)
    offset_h = _randint(0, size[0] + (1 - cut_h % 2), n, gen)
    offset_w = _randint(0, size[1] + (1 - cut_w % 2), n, gen)
    return {
        "top": offset_h - cut_h // 2,
        "left": offset_w - cut_w // 2,
        "height": torch.full_like(offset_h, cut_h),
        "width": torch.full_like(offset_w, cut_w),
    }


def _apply_cutout(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Zero the rectangle ``[top, top + height) x [left, left + width)`` clipped to the image."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).unsqueeze(0)  # (1, H)
    cols = torch.arange(w, device=x.device).unsqueeze(0)  # (1, W)
    top, left = v["top"].view(-1, 1), v["left"].view(-1, 1)
    in_rows = (rows >= top) & (rows < top + v["height"].view(-1, 1))  # (N|1, H)
    in_cols = (cols >= left) & (cols < left + v["width"].view(-1, 1))  # (N|1, W)
    keep = ~(in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2))  # (N|1, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


def _sample_flip(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """``flip`` is True where r < prob_flip."""
    return {"flip": _uniform(n, gen) < p.prob_flip}


def _apply_flip(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Horizontal flip (width axis) of the samples whose ``flip`` is True."""
    return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)


def _sample_scale(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """``sx`` then ``sy``, each from U(1 / ratio_scale, ratio_scale) independently."""
    low, high = 1.0 / p.ratio_scale, p.ratio_scale
    return {"sx": _uniform(n, gen) * (high - low) + low, "sy": _uniform(n, gen) * (high - low) + low}


def _apply_scale(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Affine ``[[sx, 0, 0], [0, sy, 0]]`` (sx acts on the width axis); >1 zooms out."""
    sx, sy = v["sx"], v["sy"]
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], -2)
    return _affine(x, theta)


def _sample_rotate(n: int, size: tuple[int, int], gen: Optional[torch.Generator], p: ParamDiffAug) -> dict[str, Tensor]:
    """``angle`` in radians: ``(r - 0.5) * 2 * ratio_rotate / 180 * pi``."""
    return {"angle": (_uniform(n, gen) - 0.5) * 2.0 * p.ratio_rotate / 180.0 * math.pi}


def _apply_rotate(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    """Rotation about the centre by ``angle`` (see :func:`_rotation_theta`); zero fill."""
    return _affine(x, _rotation_theta(v["angle"], x.shape[2], x.shape[3]))


AUGMENT_OPS: dict[str, AugmentOp] = {
    "color": AugmentOp("color", _sample_color, _apply_color),
    "crop": AugmentOp("crop", _sample_crop, _apply_crop),
    "cutout": AugmentOp("cutout", _sample_cutout, _apply_cutout),
    "flip": AugmentOp("flip", _sample_flip, _apply_flip),
    "scale": AugmentOp("scale", _sample_scale, _apply_scale),
    "rotate": AugmentOp("rotate", _sample_rotate, _apply_rotate),
}
"""The DSA operations by strategy-string name (the reference's ``AUGMENT_FNS``)."""


def validate_strategy(strategy: str) -> list[str]:
    """Parse a DSA strategy string such as ``'color_crop_cutout_flip_scale_rotate'``.

    Args:
        strategy: operation names joined by ``'_'``. ``''``, ``'none'`` and ``'None'`` (any case) mean
            no augmentation.

    Returns:
        The operation names in order (duplicates kept: like the reference, a repeated name is chosen
        proportionally more often); ``[]`` for no augmentation.

    Raises:
        ValueError: if an operation is not in ``AUGMENT_OPS``; the message names ``--dsa_strategy``, the
            bad operation and the valid ones.
    """
    return _parse_ops(strategy, AUGMENT_OPS, "--dsa_strategy", "unknown DSA operation",
                      " (e.g. 'color_crop_cutout_flip_scale_rotate')")


def _parse_ops(strategy: str, valid, what: str, unknown: str, example: str = "") -> list[str]:
    """``strategy`` split at ``'_'`` with every name checked against ``valid``; ``[]`` for
    ``''``/``'none'`` (any case).

    Raises:
        ValueError: ``{what} {strategy!r}: {unknown} {op!r}; valid operations are ...``.
    """
    if strategy is None or strategy.strip().lower() in _IDENTITY_NAMES:
        return []
    ops = strategy.strip().split("_")
    for op in ops:
        if op not in valid:
            raise ValueError(f"{what} {strategy!r}: {unknown} {op!r}; valid operations are "
                             f"{', '.join(valid)} joined by '_'{example}, or 'none'")
    return ops


def sample_diffaug_params(
    strategy: str,
    batch_size: int,
    image_size: tuple[int, int],
    generator: Optional[torch.Generator],
    siamese: bool,
    param: ParamDiffAug = ParamDiffAug(),
) -> DiffAugParams:
    """Draw one DSA transform (reference mode ``'S'``): pick one operation, then its parameters.

    The operation is chosen uniformly among the strategy's operations with one ``randint`` draw, then
    the operation draws its parameters in the reference's order (e.g. scale: sx then sy; color:
    brightness, saturation, contrast). With ``siamese=False`` each of the ``batch_size`` samples gets
    its own parameters (network training/evaluation, reference ``seed=-1``). With ``siamese=True`` a
    single parameter set is drawn and broadcast to any batch size; this is the reference's Siamese
    behaviour (same transform for real and synthetic batches, sample 0's parameters copied to the whole
    batch) without its global re-seeding.

    Args:
        strategy: DSA strategy string (see :func:`validate_strategy`).
        batch_size: number of samples N the parameters are for (ignored beyond bookkeeping if siamese).
        image_size: (H, W) of the images the parameters will be applied to.
        generator: source of randomness (a CPU generator in toolkit code); ``None`` uses the global torch
            RNG. Parameters are drawn on the generator's device.
        siamese: share one parameter set across the batch (and across batches).
        param: DSA hyper-parameters.

    Returns:
        The drawn :class:`DiffAugParams`; ``op is None`` (identity) for an empty strategy, in which case
        nothing is drawn.

    Raises:
        ValueError: for an invalid strategy, ``param.aug_mode != 'S'``, a negative ``batch_size`` or a
            malformed ``image_size``.
    """
    ops = validate_strategy(strategy)
    if param.aug_mode != "S":
        raise ValueError(f"ParamDiffAug.aug_mode {param.aug_mode!r} is not supported; only 'S' is implemented")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive sides, got {tuple(image_size)}")
    size = (int(image_size[0]), int(image_size[1]))
    if not ops:
        return DiffAugParams(None, {}, size, siamese, batch_size)
    name = ops[int(_randint(0, len(ops), 1, generator).item())]
    num_sets = 1 if siamese else batch_size
    values = AUGMENT_OPS[name].sample(num_sets, size, generator, param)
    return DiffAugParams(name, values, size, siamese, batch_size)


def apply_diffaug(x: Tensor, params: DiffAugParams) -> Tensor:
    """Apply a drawn DSA transform; differentiable with respect to ``x``.

    Args:
        x: (N, C, H, W) images, any device and floating dtype. N is free when ``params.siamese``,
            otherwise it must equal ``params.batch_size``.
        params: transform from :func:`sample_diffaug_params` (its tensors are moved to ``x.device``).

    Returns:
        (N, C, H, W) augmented images (``x`` itself for the identity).

    Raises:
        ValueError: if ``x`` is not 4-D, its (H, W) differs from ``params.image_size``, or N differs from
            ``params.batch_size`` for non-Siamese parameters.
    """
    _check_images(x)
    if params.op is None:
        return x
    if tuple(x.shape[2:]) != tuple(params.image_size):
        raise ValueError(
            f"images have size {tuple(x.shape[2:])} but the DSA parameters were drawn for {tuple(params.image_size)}"
        )
    if not params.siamese and x.shape[0] != params.batch_size:
        raise ValueError(
            f"non-Siamese DSA parameters were drawn for batch_size={params.batch_size}, got a batch of "
            f"{x.shape[0]}; draw them with siamese=True to share one transform across batch sizes"
        )
    values = {
        key: value.to(device=x.device, dtype=x.dtype if value.is_floating_point() else value.dtype)
        for key, value in params.values.items()
    }
    return AUGMENT_OPS[params.op].apply(x, values).contiguous()


def diff_augment(
    x: Tensor,
    strategy: str,
    generator: Optional[torch.Generator] = None,
    param: ParamDiffAug = ParamDiffAug(),
) -> Tensor:
    """Non-Siamese DiffAugment: one operation per call, independent parameters per sample.

    This is the reference's ``DiffAugment(x, strategy, seed=-1, param)``, used when training networks
    (evaluation and inner loops).

    Args:
        x: (N, C, H, W) images.
        strategy: DSA strategy string; empty/``'none'`` returns ``x`` unchanged.
        generator: source of randomness; ``None`` uses the global torch RNG.
        param: DSA hyper-parameters.

    Returns:
        (N, C, H, W) augmented images, differentiable with respect to ``x``.

    Raises:
        ValueError: for an invalid strategy or a non-4-D ``x``.
    """
    _check_images(x)
    if not validate_strategy(strategy):
        return x
    params = sample_diffaug_params(strategy, x.shape[0], tuple(x.shape[2:]), generator, False, param)
    return apply_diffaug(x, params)


def siamese_augment(
    x_real: Tensor,
    x_syn: Tensor,
    strategy: str,
    generator: Optional[torch.Generator],
    param: ParamDiffAug = ParamDiffAug(),
) -> tuple[Tensor, Tensor]:
    """Siamese DSA: apply ONE drawn transform to a real and a synthetic batch.

    Both batches (and every sample in them) get the same operation with the same parameters, which is
    what the reference achieves by re-seeding the global RNG with a shared seed before each call.

    Args:
        x_real: (N_real, C, H, W) real images.
        x_syn: (N_syn, C, H, W) synthetic images; N_syn may differ from N_real.
        strategy: DSA strategy string; empty/``'none'`` returns the inputs unchanged.
        generator: source of randomness; ``None`` uses the global torch RNG.
        param: DSA hyper-parameters.

    Returns:
        ``(real_augmented, syn_augmented)`` with the input shapes, differentiable with respect to both.

    Raises:
        ValueError: for an invalid strategy, non-4-D inputs, or different (H, W) of the two batches.
    """
    _check_images(x_real, "x_real")
    _check_images(x_syn, "x_syn")
    if tuple(x_real.shape[2:]) != tuple(x_syn.shape[2:]):
        raise ValueError(
            f"real and synthetic images differ in size: {tuple(x_real.shape[2:])} vs {tuple(x_syn.shape[2:])}"
        )
    params = sample_diffaug_params(strategy, x_syn.shape[0], tuple(x_syn.shape[2:]), generator, True, param)
    return apply_diffaug(x_real, params), apply_diffaug(x_syn, params)


# ---------------------------------------------------------------------------------------------------------
# DC augmentation (non-differentiable evaluation augmentation of DC, used when DSA is off)
# ---------------------------------------------------------------------------------------------------------

DC_AUGMENT_OPS: tuple[str, ...] = ("crop", "scale", "rotate", "noise")
"""Operation names understood by :func:`dc_augment`."""


@dataclass(frozen=True)
class DCAugParam:
    """DC's augmentation parameters (the ``dc_aug_param`` dict of DC ``utils.get_daparam``).

    Attributes:
        crop: padding in pixels; crop offsets are drawn from ``{0, ..., 2 * crop - 1}``.
        scale: resize factors are drawn from U(1 - scale, 1 + scale) per axis.
        rotate: integer rotation angles are drawn from ``{-rotate, ..., rotate - 1}`` degrees.
        noise: standard deviation of the additive Gaussian noise.
        strategy: operation names joined by ``'_'`` (``'none'`` = no augmentation).
    """

    crop: int = 4
    scale: float = 0.2
    rotate: int = 45
    noise: float = 0.001
    strategy: str = "none"


def validate_dc_strategy(strategy: str) -> list[str]:
    """Parse a DC augmentation strategy such as ``'crop_scale_rotate'``.

    Args:
        strategy: names from ``DC_AUGMENT_OPS`` joined by ``'_'``; ``''``/``'none'`` (any case) = none.

    Returns:
        The operation names in order (duplicates kept, as in the reference); ``[]`` for none.

    Raises:
        ValueError: for an unknown operation (the reference silently skipped it), naming the valid ones.
    """
    return _parse_ops(strategy, DC_AUGMENT_OPS, "DC augmentation strategy", "unknown operation")


def get_daparam(dataset: str, model: str, model_eval: str, ipc: int) -> DCAugParam:
    """DC's choice of evaluation augmentation (DC ``utils.get_daparam``).

    Base values crop=4, scale=0.2, rotate=45, noise=0.001, strategy='none'. The reference then sets
    ``'crop_scale_rotate'`` when ``dataset == 'MNIST'`` (exactly MNIST, not FashionMNIST), and
    ``'crop_noise'`` when ``model_eval == 'ConvNetBN'`` (checked second, so it wins for MNIST too).
    ``model`` and ``ipc`` are accepted for signature compatibility and, as in the reference, unused.

    Args:
        dataset: dataset name, e.g. ``'MNIST'``, ``'CIFAR10'``.
        model: training model name (unused).
        model_eval: evaluation model name.
        ipc: images per class (unused).

    Returns:
        The :class:`DCAugParam` to pass to :func:`dc_augment`.
    """
    del model, ipc  # unused, as in the reference
    strategy = "none"
    if dataset == "MNIST":
        strategy = "crop_scale_rotate"
    if model_eval in ("ConvNetBN",):  # the reference: BN training is easier with augmentation
        strategy = "crop_noise"
    return DCAugParam(strategy=strategy)


@dataclass(frozen=True, eq=False)
class DCAugDraws:
    """The random draws of one :func:`dc_augment` call on a batch of ``batch_size`` images.

    Produced by :func:`sample_dc_augment`, consumed by :func:`apply_dc_augment`. Several draws
    (e.g. of several evaluation networks, each from its own generator) can be joined with
    :func:`concat_dc_draws` and applied to the joined batches in one call.

    Attributes:
        members: operation name -> (m,) int64 CPU indices of the images that get it.
        values: operation name -> its per-image parameters for those m images: ``crop``: ``rows``,
            ``cols`` (m,) int64 offsets in ``{0, ..., 2 * crop - 1}``; ``scale``: ``u_h``, ``u_w``
            (m,) float32 uniforms; ``rotate``: ``degrees`` (m,) int64; ``noise``: ``noise`` (m, C, H, W)
            standard normals.
        batch_size: number of images n the draws are for.
    """

    members: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    batch_size: int = 0


def sample_dc_augment(param: DCAugParam, shape: tuple[int, int, int, int],
                      generator: Optional[torch.Generator] = None) -> DCAugDraws:
    """Draw DC's augmentation for a batch of ``shape`` (N, C, H, W), in :func:`dc_augment`'s order:
    first the per-image operation choices (one ``randint`` of N), then each operation's parameters for
    its images, in the order crop (rows, cols), scale (height factor, width factor), rotate (angles),
    noise (N(0, 1) per pixel).

    Raises:
        ValueError: for an unknown operation in ``param.strategy``.
    """
    ops = validate_dc_strategy(param.strategy)
    n, c, h, w = (int(s) for s in shape)
    if not ops or n == 0:
        return DCAugDraws({}, {}, n)
    choice = _randint(0, len(ops), n, generator).cpu()
    chosen = [ops[int(k)] for k in choice]
    members, values = {}, {}
    for name in DC_AUGMENT_OPS:
        index = [i for i, op in enumerate(chosen) if op == name]
        if not index:
            continue
        m = len(index)
        members[name] = torch.tensor(index, dtype=torch.long)
        if name == "crop":
            span = max(2 * param.crop, 1)
            values[name] = {"rows": _randint(0, span, m, generator), "cols": _randint(0, span, m, generator)}
        elif name == "scale":
            values[name] = {"u_h": _uniform(m, generator), "u_w": _uniform(m, generator)}
        elif name == "rotate":
            degrees = (_randint(-param.rotate, param.rotate, m, generator) if param.rotate > 0
                       else torch.zeros(m, dtype=torch.long))
            values[name] = {"degrees": degrees}
        else:
            values[name] = {"noise": torch.randn((m, c, h, w), generator=generator, device=_draw_device(generator))}
    return DCAugDraws(members, values, n)


def concat_dc_draws(draws: list[DCAugDraws]) -> DCAugDraws:
    """Join the draws of consecutive batches (image indices of batch j shifted by the sizes of the
    batches before it), for one :func:`apply_dc_augment` on the concatenated images."""
    members: dict[str, list[Tensor]] = {}
    values: dict[str, dict[str, list[Tensor]]] = {}
    offset = 0
    for part in draws:
        for name, index in part.members.items():
            members.setdefault(name, []).append(index + offset)
            for key, value in part.values[name].items():
                values.setdefault(name, {}).setdefault(key, []).append(value)
        offset += part.batch_size
    return DCAugDraws({name: torch.cat(parts) for name, parts in members.items()},
                      {name: {key: torch.cat(v) for key, v in kv.items()} for name, kv in values.items()}, offset)


def _dc_crop(x: Tensor, fill: Tensor, crop: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Pad ``crop`` px with the per-image fill (m, C) and take an H x W window at the drawn offsets."""
    gathered, valid = _shift_gather(x, rows.to(x.device) - crop, cols.to(x.device) - crop)
    return torch.where(valid, gathered, fill.view(x.shape[0], -1, 1, 1).to(x.dtype))


def _nearest_source(out_size: Tensor, in_size: int, length: int) -> Tensor:
    """Source indices of ``F.interpolate(mode='nearest')`` from ``in_size`` to per-sample ``out_size``.

    PyTorch computes ``min(floor(i * (in / out)), in - 1)`` in float32; this reproduces it.

    Args:
        out_size: (n,) int64 output lengths.
        in_size: input length.
        length: number of output positions to index (>= max(out_size) is not required; indices are
            clamped, and the caller masks positions outside ``out_size``).

    Returns:
        (n, length) int64 source indices in ``[0, in_size - 1]``.
    """
    ratio = torch.tensor(float(in_size), dtype=torch.float32, device=out_size.device) / out_size.to(torch.float32)
    positions = torch.arange(length, device=out_size.device, dtype=torch.float32).unsqueeze(0)
    return torch.floor(positions * ratio.unsqueeze(1)).long().clamp(0, in_size - 1)


def _dc_scale(x: Tensor, scale: float, u_h: Tensor, u_w: Tensor) -> Tensor:
    """Nearest resize to (int(f_h H), int(f_w W)), paste centred on a zero canvas, centre-crop to H x W,
    with ``f = u * 2 * scale + 1 - scale`` from the drawn uniforms ``u_h``, ``u_w`` (m,).

    Vectorised: output pixel (i, j) reads the resized image at ``(i + r_crop - r_paste, j + c_crop -
    c_paste)`` (0 outside it), whose value is the nearest-neighbour source pixel. The reference computes
    the new width from H as well (``shape[2]``); this uses W, which is identical for square images.
    """
    n, c, h, w = x.shape
    new_h = ((u_h * (2 * scale) + (1 - scale)) * h).long().clamp_min(1).to(x.device)
    new_w = ((u_w * (2 * scale) + (1 - scale)) * w).long().clamp_min(1).to(x.device)
    canvas = torch.maximum(torch.maximum(new_h, new_w), torch.tensor(max(h, w), device=x.device))
    row_shift = (canvas - h) // 2 - (canvas - new_h) // 2  # crop offset minus paste offset, rows
    col_shift = (canvas - w) // 2 - (canvas - new_w) // 2
    rows = torch.arange(h, device=x.device).unsqueeze(0) + row_shift.unsqueeze(1)  # (n, H) in resized coords
    cols = torch.arange(w, device=x.device).unsqueeze(0) + col_shift.unsqueeze(1)  # (n, W)
    row_ok = (rows >= 0) & (rows < new_h.unsqueeze(1))
    col_ok = (cols >= 0) & (cols < new_w.unsqueeze(1))
    length_h = int(max(int(new_h.max()), h)) + 1
    length_w = int(max(int(new_w.max()), w)) + 1
    src_rows = _nearest_source(new_h, h, length_h).gather(1, rows.clamp(0, length_h - 1))  # (n, H)
    src_cols = _nearest_source(new_w, w, length_w).gather(1, cols.clamp(0, length_w - 1))  # (n, W)
    flat = (src_rows.unsqueeze(-1) * w + src_cols.unsqueeze(-2)).reshape(n, 1, h * w).expand(n, c, h * w)
    gathered = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    valid = (row_ok.unsqueeze(-1) & col_ok.unsqueeze(-2)).unsqueeze(1)
    return gathered * valid.to(x.dtype)


def _dc_rotate(x: Tensor, fill: Tensor, degrees: Tensor) -> Tensor:
    """Rotate about the centre by the drawn integer angles (m,) in degrees, filling with the per-image
    ``fill`` (m,).

    The reference uses ``scipy.ndimage.rotate`` (cubic spline, reshape=True, then a centre crop, which is a
    rotation about the centre up to a half-pixel shift when the enlarged size has the wrong parity). This
    uses a bilinear ``grid_sample`` rotation (same direction: positive = counter-clockwise on screen), with
    the constant fill obtained as ``rotate(x - fill) + fill``.
    """
    angle = (degrees.to(torch.float64) * (math.pi / 180.0)).to(device=x.device, dtype=x.dtype)
    theta = _rotation_theta(angle, x.shape[2], x.shape[3])
    fill = fill.view(-1, 1, 1, 1).to(x.dtype)
    return _affine(x - fill, theta) + fill


def apply_dc_augment(images: Tensor, param: DCAugParam, draws: DCAugDraws,
                     fill: Optional[Tensor] = None) -> Tensor:
    """Apply drawn DC augmentation (see :func:`dc_augment` for the operations).

    Args:
        images: (N, C, H, W) with N = ``draws.batch_size``.
        param: the augmentation parameters the draws were made with.
        draws: from :func:`sample_dc_augment` (or :func:`concat_dc_draws`).
        fill: (N, C) per-image padding values of ``crop`` (``rotate`` fills with their mean over C);
            default: the per-channel means of the whole batch (the reference). Batches joined with
            :func:`concat_dc_draws` pass each batch's means repeated over its images.

    Returns:
        (N, C, H, W) augmented images (``images`` itself when nothing was drawn).

    Raises:
        ValueError: ``images`` is not 4-D or its N differs from ``draws.batch_size``.
    """
    _check_images(images, "images")
    if not draws.members:
        return images
    if images.shape[0] != draws.batch_size:
        raise ValueError(f"DC augmentation was drawn for {draws.batch_size} images, got {images.shape[0]}")
    if fill is None:
        with torch.no_grad():
            fill = images.mean(dim=(0, 2, 3)).expand(images.shape[0], -1)  # the reference's batch means
    out = images
    for name in DC_AUGMENT_OPS:
        if name not in draws.members:
            continue
        index = draws.members[name].to(images.device)
        subset = images.index_select(0, index)
        subset_fill = fill.index_select(0, index)
        v = draws.values[name]
        if name == "crop":
            result = _dc_crop(subset, subset_fill, param.crop, v["rows"], v["cols"])
        elif name == "scale":
            result = _dc_scale(subset, param.scale, v["u_h"], v["u_w"])
        elif name == "rotate":
            result = _dc_rotate(subset, subset_fill.mean(dim=1), v["degrees"])
        else:
            result = subset + param.noise * v["noise"].to(device=images.device, dtype=images.dtype)
        out = out.index_copy(0, index, result)
    return out


def dc_augment(images: Tensor, param: DCAugParam, generator: Optional[torch.Generator] = None) -> Tensor:
    """DC's (non-DSA) training augmentation (DC ``utils.augment``), vectorised.

    Each image independently gets ONE operation chosen uniformly from ``param.strategy``:

    * ``crop``: pad ``param.crop`` px on every side with the per-channel mean of the batch, then take an
      H x W window at row/column offsets drawn from ``{0, ..., 2 * crop - 1}`` (as the reference).
    * ``scale``: resize (nearest) to ``int(U(1 - s, 1 + s) * H) x int(U(1 - s, 1 + s) * W)``, paste centred
      on a zero canvas of side max(h, w, H, W), centre-crop back to H x W.
    * ``rotate``: integer angle in ``{-rotate, ..., rotate - 1}`` degrees about the centre, out-of-image
      pixels filled with the mean of the channel means (bilinear torch rotation instead of scipy's).
    * ``noise``: add ``param.noise * N(0, 1)``.

    Unlike the reference, the input is not modified in place. The result stays differentiable with
    respect to ``images`` although callers apply it under ``torch.no_grad()``. Random draws: first the
    per-image operation choices, then each operation's parameters for its images, in the order crop,
    scale, rotate, noise (:func:`sample_dc_augment`, then :func:`apply_dc_augment`).

    Args:
        images: (N, C, H, W) images.
        param: augmentation parameters, e.g. from :func:`get_daparam`.
        generator: source of randomness; ``None`` uses the global torch RNG.

    Returns:
        (N, C, H, W) augmented images (``images`` itself when the strategy is ``'none'``).

    Raises:
        ValueError: for an unknown operation in ``param.strategy`` or a non-4-D input.
    """
    validate_dc_strategy(param.strategy)
    _check_images(images, "images")
    draws = sample_dc_augment(param, tuple(images.shape), generator)
    return apply_dc_augment(images, param, draws)
