"""Tests for networks.py: parameter counts vs docs/reference-notes.md, the BaseNetwork contract
for every registered network, the registry and the evaluation pools."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import networks
from networks import (
    EVAL_POOLS,
    NETWORKS,
    BaseNetwork,
    ConvNet,
    create_network,
    get_eval_pool,
    get_network,
    list_networks,
    register_network,
)

MNIST = (1, (28, 28), 10)
CIFAR10 = (3, (32, 32), 10)
CIFAR100 = (3, (32, 32), 100)

# docs/reference-notes.md, *Parameter counts*: name -> (MNIST, CIFAR10, CIFAR100).
PARAM_TABLE: dict[str, tuple[int, int, int]] = {
    "ConvNet": (317_706, 320_010, 504_420),
    "ConvNetIN": (317_706, 320_010, 504_420),
    "ConvNetBN": (317_706, 320_010, 504_420),
    "ConvNetGN": (317_706, 320_010, 504_420),
    "ConvNetMP": (317_706, 320_010, 504_420),
    "ConvNetAP": (317_706, 320_010, 504_420),
    "ConvNetD1": (329_226, 331_530, 3_280_740),
    "ConvNetD2": (231_306, 233_610, 970_980),
    "ConvNetD4": (450_186, 452_490, 498_660),
    "ConvNetW32": (24_138, 24_714, 70_884),
    "ConvNetW64": (85_130, 86_282, 178_532),
    "ConvNetW256": (1_225_226, 1_229_834, 1_598_564),
    "ConvNetNN": (316_938, 319_242, 503_652),
    "ConvNetLN": (661_002, 663_306, 847_716),
    "ConvNetNP": (1_607_946, 1_610_250, 13_406_820),
    "MLP": (118_282, 411_146, 422_756),
    "LeNet": (61_706, 62_006, 69_656),
    "AlexNet": (1_865_802, 1_872_202, 2_148_772),
    "AlexNetBN": (1_867_722, 1_874_122, 2_150_692),
    "VGG11": (9_229_962, 9_231_114, 9_277_284),
    "VGG11BN": (9_229_962, 9_231_114, 9_277_284),
    "ResNet18": (11_172_810, 11_173_962, 11_220_132),
    "ResNet18BN": (11_172_810, 11_173_962, 11_220_132),
    "ResNet18BN_AP": (11_213_770, 11_250_762, 11_988_132),
}
# Variants that differ from ConvNet only by a parameter-free choice (activation), or
# by norm type with the same affine size, and ResNet18_AP (GroupNorm(C, C) has as many
# parameters as BatchNorm): derived from the table, not listed in it.
DERIVED = {name: PARAM_TABLE["ConvNet"] for name in ("ConvNetD3", "ConvNetW128", "ConvNetAS", "ConvNetAR",
                                                       "ConvNetAL", "ConvNetASwish", "ConvNetASwishBN")}
DERIVED["ResNet18_AP"] = PARAM_TABLE["ResNet18BN_AP"]

COUNT_CASES = [
    pytest.param(name, *setting, counts[i], id=f"{name}-{tag}")
    for name, counts in {**PARAM_TABLE, **DERIVED}.items()
    for i, (tag, setting) in enumerate((("MNIST", MNIST), ("CIFAR10", CIFAR10), ("CIFAR100", CIFAR100)))
] + [
    # docs/reference-notes.md, *Parameter counts*, "Further".
    pytest.param("ConvNetD4", 3, (64, 64), 200, 857_160, id="ConvNetD4-TinyImageNet"),
    pytest.param("ConvNet", 3, (64, 64), 200, 1_938_120, id="ConvNet-TinyImageNet"),
    pytest.param("ConvNetD5", 3, (128, 128), 10, 615_690, id="ConvNetD5-ImageNet128"),
]


def count_trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "channel", "im_size", "num_classes", "expected"), COUNT_CASES)
def test_parameter_count(name: str, channel: int, im_size: tuple[int, int], num_classes: int, expected: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = create_network(name, channel, num_classes, im_size)
    assert count_trainable(net) == expected


def test_embedding_widths_from_methods_md() -> None:
    """Embedding widths (docs/reference-notes.md, *Networks and parameter counts*): 2048 features
    for ConvNet on MNIST/CIFAR, D4 on 64², D5 on 128²; 8192 for D3 on 64²."""
    cases = [("ConvNet", 1, (28, 28), 2048), ("ConvNet", 3, (32, 32), 2048), ("ConvNetD4", 3, (64, 64), 2048),
             ("ConvNetD5", 3, (128, 128), 2048), ("ConvNet", 3, (64, 64), 8192),
             ("ResNet18_AP", 1, (28, 28), 512 * 9), ("ResNet18_AP", 3, (32, 32), 512 * 16)]
    for name, channel, im_size, dim in cases:
        with torch.device("meta"):
            net = create_network(name, channel, 10, im_size)
        assert net.classifier.in_features == dim, name


# Deep ConvNets pool too often for 28/32 inputs: test them at the smallest size that works.
MIN_SIZE = {"ConvNetD6": 64, "ConvNetD7": 128, "ConvNetD8": 256}


def contract_cases() -> list:
    cases = []
    for name in list_networks():
        settings = [("gray28", 1, (28, 28)), ("rgb32", 3, (32, 32))]
        if name in MIN_SIZE:
            size = MIN_SIZE[name]
            settings = [(f"rgb{size}", 3, (size, size))]
        cases += [pytest.param(name, c, s, id=f"{name}-{tag}") for tag, c, s in settings]
    return cases


@pytest.mark.parametrize(("name", "channel", "im_size"), contract_cases())
def test_network_contract(name: str, channel: int, im_size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    num_classes = 7
    net = create_network(name, channel, num_classes, im_size)
    assert isinstance(net, BaseNetwork)
    assert isinstance(net.classifier, nn.Linear)
    x = torch.randn(2, channel, *im_size, requires_grad=True)

    logits = net(x)
    assert logits.shape == (2, num_classes)
    features = net.embed(x)
    assert features.shape == (2, net.classifier.in_features)
    assert net.embed_dim == net.classifier.in_features
    torch.testing.assert_close(net.classifier(features), logits)

    maps = net.feature_maps(x)
    assert isinstance(maps, list) and maps
    expected_dim = 2 if name == "MLP" else 4
    assert all(m.dim() == expected_dim and m.shape[0] == 2 for m in maps)
    maps[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deep_convnet_too_small_input_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        create_network("ConvNetD6", 3, 10, (32, 32))


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetNP", "ConvNetLN", "ConvNetNN", "ConvNetMP", "ConvNetD1"])
def test_convnet_feature_maps_are_pre_pool_block_outputs(name: str) -> None:
    """Maps = act(norm(conv)) of each block, untouched afterwards: pooling the last one gives embed."""
    torch.manual_seed(0)
    net = create_network(name, 3, 10, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    features, maps = net.embed_with_feature_maps(x)
    assert len(maps) == len(net.blocks)
    first = net.blocks[0]
    torch.testing.assert_close(maps[0], first.act(first.norm(first.conv(x))))
    for prev_block, block, prev, cur in zip(net.blocks[:-1], net.blocks[1:], maps[:-1], maps[1:]):
        torch.testing.assert_close(cur, block.act(block.norm(block.conv(prev_block.pool(prev)))))
    torch.testing.assert_close(torch.flatten(net.blocks[-1].pool(maps[-1]), 1), features)
    torch.testing.assert_close(features, net.embed(x))


def test_convnet_default_structure() -> None:
    net = create_network("ConvNet", 1, 10, (28, 28))
    assert isinstance(net, ConvNet)
    assert len(net.blocks) == 3
    assert net.blocks[0].conv.padding == (3, 3) and net.blocks[1].conv.padding == (1, 1)
    norm = net.blocks[0].norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == 128
    assert isinstance(net.blocks[0].act, nn.ReLU) and isinstance(net.blocks[0].pool, nn.AvgPool2d)
    maps = net.feature_maps(torch.randn(2, 1, 28, 28))
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 32, 32), (128, 16, 16), (128, 8, 8)]


def test_convnet_custom_constructor_and_layernorm_shape() -> None:
    net = ConvNet(3, 5, net_width=16, net_depth=2, net_act="sigmoid", net_norm="layernorm",
                  net_pooling="maxpooling", im_size=(32, 32))
    assert tuple(net.blocks[0].norm.normalized_shape) == (16, 32, 32)
    assert tuple(net.blocks[1].norm.normalized_shape) == (16, 16, 16)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="choose from"):
        ConvNet(3, 5, net_norm="nonorm")


def test_get_network_does_not_reseed_and_moves_device() -> None:
    torch.manual_seed(123)
    a = get_network("ConvNetW32", 3, 10, (32, 32))
    b = get_network("ConvNetW32", 3, 10, (32, 32))
    # Consecutive builds differ (no reseed inside), and the same seed reproduces a build.
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    torch.manual_seed(123)
    c = get_network("ConvNetW32", 3, 10, (32, 32), device="cpu")
    assert torch.equal(a.classifier.weight, c.classifier.weight)
    assert c.classifier.weight.device.type == "cpu"


def test_unknown_network_raises_keyerror_listing_names() -> None:
    with pytest.raises(KeyError, match="unknown model 'Foo'; choose from: ConvNet, ConvNetD1") as info:
        create_network("Foo", 3, 10, (32, 32))
    assert "ResNet18BN_AP" in str(info.value)
    with pytest.raises(KeyError):
        get_network("Foo", 3, 10)


def test_registry_contents_and_duplicate_registration() -> None:
    expected = {"MLP", "LeNet", "ConvNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN",
                "ResNet18_AP", "ResNet18BN_AP", "ConvNetKIP", "ConvNetRFAD", "ConvNetAS", "ConvNetAR", "ConvNetAL",
                "ConvNetASwish", "ConvNetASwishBN", "ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN",
                "ConvNetGN", "ConvNetNP", "ConvNetMP", "ConvNetAP"}
    expected |= {f"ConvNetD{d}" for d in range(1, 9)} | {f"ConvNetW{w}" for w in (32, 64, 128, 256, 512, 1024)}
    assert set(list_networks()) == expected == set(NETWORKS)
    for pool in EVAL_POOLS.values():
        assert set(pool) <= expected

    name = "_TestOnlyNet"
    try:
        register_network(name)(networks.MLP)
        assert name in list_networks()
        with pytest.raises(ValueError, match="already registered"):
            register_network(name)(networks.LeNet)
        with pytest.raises(ValueError):
            register_network("ConvNet")(networks.MLP)
    finally:
        NETWORKS.pop(name, None)


def test_eval_pools() -> None:
    assert get_eval_pool("M", "ConvNet") == ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"]
    assert get_eval_pool("B", "ConvNetBN") == ["ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"]
    assert get_eval_pool("W", "ConvNet") == ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"]
    assert get_eval_pool("D", "ConvNet") == ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"]
    assert get_eval_pool("P", "ConvNet") == ["ConvNetNP", "ConvNetMP", "ConvNetAP"]
    assert get_eval_pool("N", "ConvNet") == ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"]
    assert get_eval_pool("S", "ConvNetBN") == ["ConvNet"]
    assert get_eval_pool("S", "ConvNet") == ["ConvNet"]
    assert get_eval_pool("S", "ResNet18BN_AP") == ["ResNet18"]  # DC quirk: cut at the first "BN"
    assert get_eval_pool("SS", "ConvNetBN") == ["ConvNetBN"]
    assert get_eval_pool("C", "ResNet18", "ignored") == ["ResNet18", "ConvNet"]
    pool = get_eval_pool("M", "ConvNet")
    pool.append("X")  # callers get a copy
    assert "X" not in EVAL_POOLS["M"]
    with pytest.raises(ValueError, match="choose from: M, B"):
        get_eval_pool("Q", "ConvNet")
