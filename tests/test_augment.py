"""Tests for augment.py: DSA (DiffAugment) and DC augmentation. CPU, a few seconds."""
import math

import pytest
import torch
import torch.nn.functional as F

import augment
from augment import (
    AUGMENT_OPS,
    DCAugParam,
    DiffAugParams,
    ParamDiffAug,
    apply_diffaug,
    dc_augment,
    diff_augment,
    get_daparam,
    sample_diffaug_params,
    siamese_augment,
    validate_strategy,
)

OPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]
FULL = "color_crop_cutout_flip_scale_rotate"
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 24, 40)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n, shape=(3, 32, 32), seed=0, dtype=torch.float32):
    return torch.randn(n, *shape, generator=_gen(seed + 1000), dtype=dtype)


# ----------------------------------------------------------------------------------------------- config


def test_param_diffaug_reference_values():
    p = ParamDiffAug()
    assert (p.aug_mode, p.prob_flip, p.ratio_scale, p.ratio_rotate) == ("S", 0.5, 1.2, 15.0)
    assert (p.ratio_crop_pad, p.ratio_cutout, p.brightness, p.saturation, p.contrast) == (0.125, 0.5, 1.0, 2.0, 0.5)
    assert set(AUGMENT_OPS) == set(OPS)


def test_validate_strategy():
    assert validate_strategy(FULL) == OPS
    assert validate_strategy("color_crop_cutout_scale_rotate") == ["color", "crop", "cutout", "scale", "rotate"]
    for empty in ("", "none", "None"):
        assert validate_strategy(empty) == []
    with pytest.raises(ValueError) as err:
        validate_strategy("color_foo")
    msg = str(err.value)
    assert "--dsa_strategy" in msg and "'foo'" in msg
    assert all(op in msg for op in OPS)


def test_unsupported_aug_mode_raises():
    with pytest.raises(ValueError, match="aug_mode"):
        sample_diffaug_params("crop", 2, (8, 8), _gen(), False, ParamDiffAug(aug_mode="M"))


# ----------------------------------------------------------------------------------------------- DSA


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_shape_preserved(op, shape):
    x = _images(5, shape)
    assert diff_augment(x, op, _gen()).shape == x.shape
    real, syn = siamese_augment(x, x[:2], op, _gen())
    assert real.shape == x.shape and syn.shape == (2, *shape)


def test_identity_strategy_returns_input():
    x = _images(3)
    for s in ("", "none", "None"):
        assert diff_augment(x, s, _gen()) is x
        real, syn = siamese_augment(x, x[:1], s, _gen())
        assert real is x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_siamese_same_transform(op, shape):
    syn = _images(3, shape, seed=1)
    real = torch.cat([syn, _images(4, shape, seed=2)])
    for seed in range(3):
        real_aug, syn_aug = siamese_augment(real, syn, op, _gen(seed))
        torch.testing.assert_close(real_aug[:3], syn_aug)
        # Siamese mode also gives every sample of a batch the same transform.
        same = torch.cat([syn[:1]] * 3)
        _, same_aug = siamese_augment(real, same, op, _gen(seed))
        torch.testing.assert_close(same_aug, same_aug[:1].expand_as(same_aug))


@pytest.mark.parametrize("op", OPS)
def test_global_rng_untouched(op):
    x = _images(4)
    state = torch.get_rng_state()
    diff_augment(x, op, _gen(3))
    siamese_augment(x, x[:2], op, _gen(4))
    sample_diffaug_params(FULL, 4, (32, 32), _gen(5), False)
    dc_augment(x, DCAugParam(strategy="crop_scale_rotate_noise"), _gen(6))
    assert torch.equal(state, torch.get_rng_state())


def test_same_seed_same_output_different_seed_differs():
    x = _images(6)
    for strategy in ("rotate", "color", FULL):
        a = diff_augment(x, strategy, _gen(7))
        b = diff_augment(x, strategy, _gen(7))
        assert torch.equal(a, b)
    assert not torch.equal(diff_augment(x, "rotate", _gen(7)), diff_augment(x, "rotate", _gen(8)))
    assert not torch.equal(diff_augment(x, "color", _gen(7)), diff_augment(x, "color", _gen(8)))
    params = sample_diffaug_params(FULL, 6, (32, 32), _gen(9), True)
    torch.testing.assert_close(apply_diffaug(x, params), apply_diffaug(x, params))


@pytest.mark.parametrize("siamese", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_gradient_flows(op, siamese):
    x = _images(4).requires_grad_(True)
    if siamese:
        out, _ = siamese_augment(x, x.detach()[:1], op, _gen(1))
    else:
        out = diff_augment(x, op, _gen(1))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_operation_choice_is_uniform():
    counts = {op: 0 for op in OPS}
    gen = _gen(11)
    for _ in range(600):
        counts[sample_diffaug_params(FULL, 1, (8, 8), gen, True).op] += 1
    assert all(60 < c < 140 for c in counts.values()), counts


def test_per_sample_parameters_when_not_siamese():
    params = sample_diffaug_params("scale", 16, (32, 32), _gen(2), siamese=False)
    assert params.values["sx"].shape == (16,) and params.values["sx"].unique().numel() == 16
    assert params.values["sx"].min() >= 1 / 1.2 and params.values["sx"].max() <= 1.2
    siam = sample_diffaug_params("scale", 16, (32, 32), _gen(2), siamese=True)
    assert siam.values["sx"].shape == (1,)
    rot = sample_diffaug_params("rotate", 1000, (32, 32), _gen(2), siamese=False).values["angle"]
    assert rot.abs().max() <= math.radians(15.0) and rot.abs().max() > math.radians(14.0)


def test_batch_and_size_checks():
    x = _images(4)
    params = sample_diffaug_params("crop", 4, (32, 32), _gen(), siamese=False)
    with pytest.raises(ValueError, match="batch_size"):
        apply_diffaug(x[:3], params)
    with pytest.raises(ValueError, match="size"):
        apply_diffaug(_images(4, (3, 28, 28)), params)
    siam = sample_diffaug_params("crop", 4, (32, 32), _gen(), siamese=True)
    assert apply_diffaug(_images(9), siam).shape == (9, 3, 32, 32)
    with pytest.raises(ValueError):
        siamese_augment(x, _images(2, (3, 28, 28)), "crop", _gen())
    with pytest.raises(ValueError):
        diff_augment(x[0], "crop", _gen())


def test_flip_forced():
    x = _images(3, (3, 8, 12))
    on = DiffAugParams("flip", {"flip": torch.tensor([True])}, (8, 12), siamese=True, batch_size=3)
    off = DiffAugParams("flip", {"flip": torch.tensor([False])}, (8, 12), siamese=True, batch_size=3)
    assert torch.equal(apply_diffaug(x, on), x.flip(3))
    assert torch.equal(apply_diffaug(x, off), x)
    mixed = DiffAugParams("flip", {"flip": torch.tensor([True, False, True])}, (8, 12), False, 3)
    out = apply_diffaug(x, mixed)
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(2))


def test_crop_constant_image_zeros_vacated_border():
    x = torch.ones(1, 2, 10, 12)
    params = DiffAugParams("crop", {"tx": torch.tensor([2]), "ty": torch.tensor([-3])}, (10, 12), True, 1)
    out = apply_diffaug(x, params)
    expected = torch.ones_like(x)
    expected[:, :, -2:, :] = 0  # out[i] = x[i + 2]: the last 2 rows have no source
    expected[:, :, :, :3] = 0  # out[j] = x[j - 3]: the first 3 columns have no source
    assert torch.equal(out, expected)


def test_crop_matches_loop_oracle_and_range():
    x = _images(16, (3, 32, 32))
    params = sample_diffaug_params("crop", 16, (32, 32), _gen(5), siamese=False)
    tx, ty = params.values["tx"], params.values["ty"]
    assert tx.min() >= -4 and tx.max() <= 4 and ty.min() >= -4 and ty.max() <= 4  # int(32 * 0.125 + 0.5)
    out = apply_diffaug(x, params)
    expected = torch.zeros_like(x)
    for n in range(16):
        for i in range(32):
            for j in range(32):
                si, sj = i + int(tx[n]), j + int(ty[n])
                if 0 <= si < 32 and 0 <= sj < 32:
                    expected[n, :, i, j] = x[n, :, si, sj]
    assert torch.equal(out, expected)


def test_cutout_forced_square_and_sampled_clipping():
    x = torch.ones(2, 3, 32, 32)
    forced = DiffAugParams(
        "cutout",
        {
            "top": torch.tensor([5]),
            "left": torch.tensor([7]),
            "height": torch.tensor([16]),
            "width": torch.tensor([16]),
        },
        (32, 32),
        True,
        2,
    )
    out = apply_diffaug(x, forced)
    expected = torch.ones_like(x)
    expected[:, :, 5:21, 7:23] = 0
    assert torch.equal(out, expected)
    # Sampled: side int(32 * 0.5 + 0.5) = 16; centre offsets in {0..32}; zero region is that square clipped.
    params = sample_diffaug_params("cutout", 64, (32, 32), _gen(3), siamese=False)
    out = apply_diffaug(torch.ones(64, 1, 32, 32), params)
    for n in range(64):
        top, left = int(params.values["top"][n]), int(params.values["left"][n])
        assert -8 <= top <= 24 and -8 <= left <= 24
        ref = torch.ones(32, 32)
        ref[max(top, 0):max(top + 16, 0), max(left, 0):max(left + 16, 0)] = 0
        assert torch.equal(out[n, 0], ref)
    # Non-square: per-axis sides.
    p = sample_diffaug_params("cutout", 1, (20, 40), _gen(), True)
    assert int(p.values["height"]) == 10 and int(p.values["width"]) == 20


def test_color_formula():
    x = _images(2, (3, 4, 4))
    b, s, c = torch.tensor([0.2]), torch.tensor([1.5]), torch.tensor([0.7])
    params = DiffAugParams("color", {"brightness": b, "saturation": s, "contrast": c}, (4, 4), True, 2)
    y = x + 0.2
    y = (y - y.mean(1, keepdim=True)) * 1.5 + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * 0.7 + y.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(apply_diffaug(x, params), y)


def test_scale_and_rotate_identity_and_rot90():
    x = _images(2, (3, 9, 9))
    one = DiffAugParams("scale", {"sx": torch.tensor([1.0]), "sy": torch.tensor([1.0])}, (9, 9), True, 2)
    torch.testing.assert_close(apply_diffaug(x, one), x)
    zero = DiffAugParams("rotate", {"angle": torch.tensor([0.0])}, (9, 9), True, 2)
    torch.testing.assert_close(apply_diffaug(x, zero), x)
    quarter = DiffAugParams("rotate", {"angle": torch.tensor([math.pi / 2])}, (9, 9), True, 2)
    # Positive angle = counter-clockwise on screen (align_corners=True makes 90 degrees exact).
    torch.testing.assert_close(apply_diffaug(x, quarter), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(21, 21), (17, 29)])
def test_rotation_matches_scipy_in_pixel_space(size):
    ndimage = pytest.importorskip("scipy.ndimage")
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    img = torch.sin(3 * xx) * torch.cos(2 * yy) + xx  # smooth, so bilinear vs linear differences vanish
    angle = 30.0
    ours = augment._affine(img[None, None], augment._rotation_theta(torch.tensor([math.radians(angle)]), h, w))[0, 0]
    ref = torch.from_numpy(ndimage.rotate(img.numpy(), angle, reshape=False, order=1)).float()
    inner = (slice(h // 3, h - h // 3), slice(w // 3, w - w // 3))
    torch.testing.assert_close(ours[inner], ref[inner], atol=1e-4, rtol=0)


def test_float64_and_device_agnostic_params():
    x = _images(3, dtype=torch.float64)
    for op in OPS:
        out = diff_augment(x, op, _gen(1))
        assert out.dtype == torch.float64
    assert all(v.device.type == "cpu" for v in sample_diffaug_params(FULL, 3, (32, 32), _gen(), False).values.values())


# ----------------------------------------------------------------------------------------------- DC


def test_get_daparam():
    base = get_daparam("CIFAR10", "ConvNet", "ConvNet", 10)
    assert (base.crop, base.scale, base.rotate, base.noise, base.strategy) == (4, 0.2, 45, 0.001, "none")
    assert get_daparam("MNIST", "ConvNet", "ConvNet", 1).strategy == "crop_scale_rotate"
    assert get_daparam("FashionMNIST", "ConvNet", "ConvNet", 1).strategy == "none"
    assert get_daparam("CIFAR10", "ConvNet", "ConvNetBN", 1).strategy == "crop_noise"
    assert get_daparam("MNIST", "ConvNet", "ConvNetBN", 1).strategy == "crop_noise"


@pytest.mark.parametrize("shape", SHAPES)
def test_dc_augment_shape_and_none(shape):
    x = _images(6, shape)
    assert dc_augment(x, DCAugParam(), _gen()) is x
    for strategy in ("crop", "scale", "rotate", "noise", "crop_scale_rotate", "crop_noise"):
        out = dc_augment(x, DCAugParam(strategy=strategy), _gen(1))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_dc_noise_small_and_deterministic():
    x = _images(8)
    out = dc_augment(x, DCAugParam(strategy="noise"), _gen(2))
    diff = (out - x).abs()
    assert diff.max() > 0 and diff.max() < 0.01
    assert abs(float((out - x).std()) - 0.001) < 1e-4
    assert torch.equal(out, dc_augment(x, DCAugParam(strategy="noise"), _gen(2)))
    assert not torch.equal(out, dc_augment(x, DCAugParam(strategy="noise"), _gen(3)))


def test_dc_crop_fills_with_channel_means():
    x = torch.zeros(4, 2, 8, 8)
    x[:, 1] = 1.0
    x[0, 0] = 4.0  # channel 0 batch mean = 1.0
    out = dc_augment(x, DCAugParam(strategy="crop"), _gen(4))
    assert out.shape == x.shape
    # Every output pixel is either a source pixel or the channel mean (channel 1 is constant 1).
    assert torch.equal(out[:, 1], torch.ones(4, 8, 8))
    values = set(out[:, 0].unique().tolist())
    assert values <= {0.0, 1.0, 4.0}


def test_dc_scale_matches_reference_resize():
    x = _images(4, (2, 12, 12))
    out = dc_augment(x, DCAugParam(strategy="scale"), _gen(5))
    h_img = 12

    def reference_scale(img, h, w):  # DC's scalefun for one image, restated
        tmp = F.interpolate(img[None], [h, w])[0]
        mhw = max(h, w, h_img, h_img)
        canvas = torch.zeros(img.shape[0], mhw, mhw)
        r, c = (mhw - h) // 2, (mhw - w) // 2
        canvas[:, r:r + h, c:c + w] = tmp
        r, c = (mhw - h_img) // 2, (mhw - h_img) // 2
        return canvas[:, r:r + h_img, c:c + h_img]

    sizes = range(int(0.8 * h_img), int(1.2 * h_img) + 1)
    for n in range(4):
        assert any(torch.equal(out[n], reference_scale(x[n], h, w)) for h in sizes for w in sizes)


def test_dc_rotate_constant_image_and_errors():
    x = torch.full((5, 3, 16, 16), 0.3)
    out = dc_augment(x, DCAugParam(strategy="rotate"), _gen(6))
    torch.testing.assert_close(out, x)  # fill value = mean of channel means = 0.3
    with pytest.raises(ValueError, match="unknown operation"):
        dc_augment(x, DCAugParam(strategy="crop_flip"), _gen())


def test_dc_augment_keeps_grad_and_input():
    x = _images(6).requires_grad_(True)
    before = x.detach().clone()
    out = dc_augment(x, DCAugParam(strategy="crop_scale_rotate_noise"), _gen(7))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.detach(), before)
