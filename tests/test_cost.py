"""Cost measures: FLOPs and parameters against hand counts, storage bytes, peak memory, cost.py."""
import json

import pytest
import torch

import data
import networks
import torch.nn as nn

from scripts import cost
from pretrained import originals
from sets import resources
from methods.base import SyntheticSet


def test_flops_of_tiny_conv_and_linear_net_equal_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    # conv: 72 outputs x 9 multiply-adds x 2; linear: 72 x 3 multiply-adds x 2 (ReLU not counted)
    assert networks.flops_per_image(net, 1, (8, 8)) == 2 * 72 * 9 + 2 * 72 * 3
    assert networks.count_parameters(net) == (2 * 9 + 2) + (72 * 3 + 3)


def test_network_cost_of_mlp_on_fashion_mnist_matches_hand_count():
    row = resources.network_cost("MLP", 1, (28, 28), 10)
    # 784 -> 128 -> 128 -> 10 (docs/reference-notes.md: 118,282 parameters)
    assert row["params"] == 118_282
    assert row["flops_per_image"] == 2 * (784 * 128 + 128 * 128 + 128 * 10)
    assert row["macs_per_image"] == row["flops_per_image"] // 2


def test_dataset_shape_and_errors():
    assert data.dataset_shape("FashionMNIST") == (1, (28, 28), 10)
    assert data.dataset_shape("imagewoof", res=64) == (3, (64, 64), 10)
    with pytest.raises(ValueError, match="--res"):
        data.dataset_shape("CIFAR10", res=64)
    with pytest.raises(ValueError, match="--dataset 'Nope'"):
        data.dataset_shape("Nope")


def test_synthetic_storage_counts_images_labels_and_learned_extras():
    syn = SyntheticSet(torch.zeros(6, 3, 4, 4), SyntheticSet.class_major_labels(3, 2), 3, 2)
    assert resources.synthetic_storage(syn) == {"images": 6 * 48 * 4, "labels": 6 * 8, "total": 6 * 48 * 4 + 48}
    syn.learn_lr(0.01)
    syn.learn_soft_labels(torch.zeros(6, 3))
    # soft labels are stored as (6, 3) float32 logits instead of the int64 labels, plus one float lr
    assert resources.synthetic_storage(syn) == {"images": 1152, "labels": 72, "syn_lr": 4, "total": 1228}


def test_peak_memory_on_cpu_is_positive():
    peak = resources.peak_memory(torch.device("cpu"))
    assert peak["bytes"] > 10 * 2**20 and "ru_maxrss" in peak["measure"]


def test_cost_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost.main(["--dataset", "FashionMNIST", "--models", "MLP", "LeNet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MLP" in printed and "118,282" in printed
    saved = json.loads(out.read_text())
    assert [row["model"] for row in saved["networks"]] == ["MLP", "LeNet"]
    with pytest.raises(SystemExit) as error:
        cost.main(["--dataset", "FashionMNIST", "--run_dir", str(tmp_path)])
    assert error.value.code == 2
    assert "no results.json" in capsys.readouterr().err
