"""Continual learning: class orders, seen classes, memory and test restricted to them, the CLI."""
import json

import numpy as np
import pytest
import torch

from scripts import continual
from sets import continual as cl_lib
import data
import evaluation
from sets import files
from tiny_data import tiny_record


def test_class_orders_are_the_reference_permutations():
    orders = cl_lib.class_orders(10)
    assert len(orders) == 5
    for seed, order in enumerate(orders):
        np.random.seed(seed)
        assert order == np.random.permutation(10).tolist()
        assert sorted(order) == list(range(10))


def test_seen_classes_grow_by_k_over_steps():
    order = [3, 1, 4, 0, 2, 5, 9, 8, 7, 6]
    assert cl_lib.seen_classes(order, 5, 0) == [3, 1]
    assert cl_lib.seen_classes(order, 5, 4) == order
    assert cl_lib.seen_classes(order, 3, 2) == order[:9]  # K // steps = 3 per step; class 6 never used
    with pytest.raises(ValueError, match="--steps 11"):
        cl_lib.seen_classes(order, 11, 0)


def test_restrict_keeps_only_listed_classes():
    images = torch.arange(6.0).reshape(6, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x, y = cl_lib.restrict(images, labels, [2, 0])
    assert y.tolist() == [0, 2, 0, 2] and x.flatten().tolist() == [0.0, 2.0, 3.0, 5.0]


def test_each_step_trains_and_tests_on_seen_classes_only(monkeypatch):
    record = tiny_record(num_classes=4, per_class=6, size=8)
    calls = []

    def fake_evaluate(images, labels, model, num_classes, test_images, test_labels, cfg, *, num_eval, device, seed):
        calls.append((sorted(set(labels.tolist())), sorted(set(test_labels.tolist())), test_labels.numel(), num_classes))
        return evaluation.EvalResult(model, [0.25 * len(set(test_labels.tolist()))] * num_eval)

    monkeypatch.setattr(evaluation, "evaluate_synset", fake_evaluate)
    memory = (record.images_train, record.labels_train)
    outcome = cl_lib.run_continual({"all": lambda index: memory}, record, steps=2, model="ConvNet",
                                      cfg=evaluation.EvalConfig(epochs=1), num_eval=2, device=torch.device("cpu"),
                                      num_orders=3, log=lambda line: None)
    assert len(calls) == 3 * 2
    for (train_classes, test_classes, count, k), (order_index, step) in zip(calls, [(o, t) for o in range(3) for t in range(2)]):
        seen = sorted(cl_lib.class_orders(4, 3)[order_index][:2 * (step + 1)])
        assert train_classes == test_classes == seen
        assert count == 3 * len(seen)  # tiny_record has per_class // 2 = 3 test images per class
        assert k == 4  # the network always has K outputs
    # step t accuracy list = orders x networks values, here 0.25 * seen classes
    assert outcome["accs"]["all"][0] == [0.5] * 6 and outcome["accs"]["all"][1] == [1.0] * 6


def test_continual_cli_runs_sets_and_baselines(tmp_path, monkeypatch, capsys, one_thread):
    record = tiny_record(num_classes=2, per_class=4, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    images = record.images_train[[0, 4]]
    files.save_results(str(tmp_path / "res_X.pt"), [[images, torch.tensor([0, 1])]], {},
                       meta={"method": "X", "dataset": "Tiny3"})
    out = tmp_path / "cl" / "cl.json"
    code = continual.main(["--dataset", "Tiny3", "--syn_path", str(tmp_path / "res_X.pt"), "--steps", "2",
                           "--num_eval", "1", "--epoch_eval_train", "1", "--orders", "2", "--device", "cpu",
                           "--dsa_strategy", "none", "--out", str(out)])
    assert code == 0
    blob = json.loads(out.read_text())
    assert set(blob["accs"]) == {"X (res_X.pt)", "random ipc 1", "herding ipc 1"}
    assert all(len(per_step) == 2 and len(per_step[0]) == 2 for per_step in blob["accs"].values())
    # step 1 sees one class: a K-way network trained on one class predicts it everywhere -> 100 %
    assert blob["summary"]["random ipc 1"][0]["mean"] == pytest.approx(1.0)
    assert (tmp_path / "cl" / "cl.png").stat().st_size > 1000
    assert "step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        continual.main(["--dataset", "Tiny3", "--steps", "3", "--ipc", "1", "--device", "cpu"])
    assert "--steps 3" in capsys.readouterr().err
