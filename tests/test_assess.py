"""Assessments without training (assess.py, evaluate.py --assess) and scripts/assess_correlation.py, CPU."""
import json
import math
import os

import pytest
import torch

from sets import assess
import data
import evaluate
from pretrained import original_files
from sets import files
from tiny_data import tiny_record as _tiny_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from scripts import assess_correlation  # noqa: E402

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


def tiny_record(**kw):
    """The shared miniature with 16 training images per class."""
    return _tiny_record(**{"per_class": 16, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


# ----- pure functions ---------------------------------------------------------------------------
def test_om_scores_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    acc, loss = assess.om_scores(logits, labels)
    assert acc == pytest.approx(2 / 3)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 3
    assert loss == pytest.approx(expected, rel=1e-6)
    soft = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])  # argmax labels 0, 1, 1
    assert assess.om_scores(logits, soft)[0] == pytest.approx(2 / 3)


def test_class_mean_distance_hand_computed():
    feat_real = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    label_real = torch.tensor([0, 0, 1])
    feat_syn = torch.tensor([[1.0, 0.0], [5.0, 1.0]])
    # class 0: mean (1, 0) vs (1, 0): 0; class 1: (5, 1) vs (5, 5): 4; class 2 absent: skipped
    assert assess.class_mean_distance(feat_syn, torch.tensor([0, 1]), feat_real, label_real, 3) == pytest.approx(2.0)


def test_median_bandwidth_and_mmd_hand_computed():
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0], [3.0]])
    # squared distances of the pairs of {0, 1, 3}: 1, 9, 4 -> median 4
    assert assess.median_bandwidth(x, y) == pytest.approx(4.0)
    k = lambda d2: math.exp(-d2 / 4.0)  # noqa: E731
    expected = 1.0 + (2 + 2 * k(4)) / 4 - 2 * (k(1) + k(9)) / 2
    assert assess.mmd_rbf(x, y) == pytest.approx(expected, rel=1e-9)
    z = torch.randn(6, 4)
    assert assess.mmd_rbf(z, z.clone()) == pytest.approx(0.0, abs=1e-12)
    assert assess.mmd_rbf(z, z + 3) > 0.1


def test_pixel_statistics_hand_computed_and_zero_for_equal_sets():
    real = torch.tensor([[[[0.0, 2.0]]], [[[2.0, 2.0]]]])  # one class, two 1x1x2 images
    syn = torch.tensor([[[[1.0, 0.0]]]])  # mean (1, 0) vs (1, 2); std (0, 0) vs (1, 0)
    out = assess.pixel_statistics_distance(syn, torch.tensor([0]), real, torch.tensor([0, 0]), 1)
    assert out["pixel_mean_dist"] == pytest.approx(math.sqrt((0 + 4) / 2))
    assert out["pixel_std_dist"] == pytest.approx(math.sqrt((1 + 0) / 2))
    same = assess.pixel_statistics_distance(real, torch.tensor([0, 0]), real, torch.tensor([0, 0]), 1)
    assert same == {"pixel_mean_dist": 0.0, "pixel_std_dist": 0.0}


def test_sample_real_draws_per_class():
    record = tiny_record()
    images, labels = assess.sample_real(record.images_train, record.labels_train, 3, 5, seed=1)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    again, _ = assess.sample_real(record.images_train, record.labels_train, 3, 5, seed=1)
    assert torch.equal(images, again)
    with pytest.raises(ValueError):
        assess.sample_real(record.images_train, record.labels_train, 3, 0)


# ----- with original models ---------------------------------------------------------------------
def test_om_accuracy_one_on_correctly_classified_images(pretrained):
    record = tiny_record()
    models = original_files.load_original_models(pretrained, "Tiny3", MODEL, 2, CPU)
    images = record.images_test
    with torch.no_grad():
        predictions = [net(images).argmax(1) for net in models]
    agree = predictions[0] == predictions[1]
    assert agree.sum() >= 3
    image_syn, label_syn = images[agree], predictions[0][agree]
    out = assess.assess_set(image_syn, label_syn, models, record.images_train, record.labels_train, 3, CPU)
    assert out["om_acc"] == 1.0 and out["om_acc_per_model"] == [1.0, 1.0]
    wrong = assess.assess_set(image_syn, (label_syn + 1) % 3, models, record.images_train, record.labels_train, 3, CPU)
    assert wrong["om_acc"] == 0.0 and wrong["om_loss"] > out["om_loss"]


def test_distances_zero_when_syn_equals_real(pretrained):
    record = tiny_record()
    models = original_files.load_original_models(pretrained, "Tiny3", MODEL, 2, CPU)
    real, labels = assess.sample_real(record.images_train, record.labels_train, 3, 4)
    out = assess.assess_set(real, labels, models, real, labels, 3, CPU)
    for key in ("feat_mean_dist", "feat_mmd", "pixel_mean_dist", "pixel_std_dist"):
        assert out[key] == pytest.approx(0.0, abs=1e-5), key
    noisy = assess.assess_set(real + torch.randn_like(real), labels, models, real, labels, 3, CPU)
    assert all(noisy[key] > 1e-3 for key in ("feat_mean_dist", "feat_mmd", "pixel_mean_dist", "pixel_std_dist"))


def write_result(path, record, sets):
    files.save_results(str(path), [[images, labels] for images, labels in sets], {MODEL: [0.5]},
                       meta={"dataset": "Tiny3", "dsa_strategy": ""})


def test_evaluate_assess_prints_table_and_writes_json(pretrained, tmp_path, monkeypatch, capsys):
    record = tiny_record()
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: record)
    real, labels = assess.sample_real(record.images_train, record.labels_train, 3, 2)
    path = tmp_path / "run" / "res_DM_Tiny3_ConvNetW32_2ipc.pt"
    path.parent.mkdir()
    write_result(path, record, [(real, labels), (torch.randn_like(real), labels)])
    argv = ["--dataset", "Tiny3", "--syn_path", str(path), "--assess", "--model", MODEL, "--pretrained_path",
            pretrained, "--assess_real", "6", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "OM accuracy" in printed and "exp 1" in printed and "mean" in printed
    report = json.load(open(tmp_path / "run" / "res_DM_Tiny3_ConvNetW32_2ipc_assess.json"))
    assert report["models"] == {MODEL: 2} and report["real_per_class"] == 6
    assert len(report["experiments"]) == 2
    assert set(report["metrics"]) == {key for key, _, _ in assess.METRICS}
    first, second = report["experiments"]
    assert report["metrics"]["om_acc"] == pytest.approx((first["om_acc"] + second["om_acc"]) / 2)
    assert first["pixel_mean_dist"] < second["pixel_mean_dist"]  # real images vs noise
    # --model_num limits the pool; --out elsewhere
    out = tmp_path / "elsewhere.json"
    assert evaluate.main(argv + ["--model_num", "1", "--out", str(out)]) == 0
    assert json.load(open(out))["models"] == {MODEL: 1}


def test_evaluate_assess_missing_models_is_one_line(tmp_path, monkeypatch, capsys):
    record = tiny_record()
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: record)
    path = tmp_path / "res.pt"
    write_result(path, record, [(record.images_train[:3], torch.tensor([0, 1, 2]))])
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", str(path), "--assess", "--model", MODEL,
                       "--pretrained_path", str(tmp_path / "none"), "--device", "cpu"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_original.py --dataset Tiny3 --model ConvNetW32" in err
    with pytest.raises(SystemExit):
        evaluate.main(["--dataset", "Tiny3", "--baseline", "random", "--ipc", "1", "--assess"])
    assert "--assess needs --syn_path" in capsys.readouterr().err


# ----- correlation script -----------------------------------------------------------------------
def fake_runs(root, accuracies, ipcs=None):
    """One run directory per accuracy: results.json and an assessment whose om_acc rises with the
    accuracy and whose distances fall."""
    for index, acc in enumerate(accuracies):
        run = root / f"nested{index % 2}" / f"run{index}"
        run.mkdir(parents=True)
        results = {"accuracy": {MODEL: {"mean": acc, "std": 0.0, "accs": [acc]}}}
        if ipcs is not None:
            results["ipc"] = ipcs[index]
        json.dump(results, open(run / "results.json", "w"))
        metrics = {"om_acc": acc ** 2, "om_loss": 1 - acc, "feat_mean_dist": 5 - 4 * acc, "feat_mmd": 1 / (1 + acc),
                   "pixel_mean_dist": 0.3, "pixel_std_dist": (index * 7) % 4}
        json.dump({"metrics": metrics, "experiments": []}, open(run / f"res_{index}_assess.json", "w"))


def test_correlation_script_monotone_relation(tmp_path, capsys):
    fake_runs(tmp_path, [0.3, 0.5, 0.45, 0.8])
    assert assess_correlation.main([str(tmp_path), "--out", str(tmp_path / "corr.json")]) == 0
    printed = capsys.readouterr().out
    assert "| assessment | Spearman rho" in printed and "4 assessed synthetic sets" in printed
    rows = {r["metric"]: r for r in json.load(open(tmp_path / "corr.json"))["correlations"]}
    assert rows["om_acc"]["spearman"] == pytest.approx(1.0) and rows["om_acc"]["kendall"] == pytest.approx(1.0)
    assert rows["feat_mean_dist"]["spearman"] == pytest.approx(-1.0)
    assert rows["feat_mmd"]["kendall"] == pytest.approx(-1.0)
    assert math.isnan(rows["pixel_mean_dist"]["spearman"])  # constant column
    assert rows["om_acc"]["n"] == 4
    for key in rows:
        assert os.path.getsize(tmp_path / "assess_correlation" / f"scatter_{key}.png") > 1000


def test_correlation_script_needs_three_sets(tmp_path, capsys):
    fake_runs(tmp_path, [0.3, 0.5])
    assert assess_correlation.main([str(tmp_path)]) == 2
    assert "found 2 assessed set(s)" in capsys.readouterr().err


def test_correlation_script_per_ipc_tables(tmp_path, capsys):
    """Within each ipc om_acc rises with accuracy, but ipc 1 sets have higher om_acc and lower
    accuracy, so the pooled Spearman is negative; the per-ipc tables must show +1."""
    accuracies = [0.50, 0.55, 0.60, 0.80, 0.82, 0.84]
    ipcs = [1, 1, 1, 10, 10, 10]
    fake_runs(tmp_path, accuracies, ipcs)
    for index, acc in enumerate(accuracies):  # om_acc: high for ipc 1, rising with accuracy inside each ipc
        path = tmp_path / f"nested{index % 2}" / f"run{index}" / f"res_{index}_assess.json"
        report = json.load(open(path))
        report["metrics"]["om_acc"] = (1.0 if ipcs[index] == 1 else 0.0) + acc
        json.dump(report, open(path, "w"))
    assert assess_correlation.main([str(tmp_path), "--out", str(tmp_path / "corr.json")]) == 0
    printed = capsys.readouterr().out
    assert "ipc 1 only (3 sets)" in printed and "ipc 10 only (3 sets)" in printed
    saved = json.load(open(tmp_path / "corr.json"))
    pooled = {r["metric"]: r for r in saved["correlations"]}
    assert pooled["om_acc"]["spearman"] < 0
    for ipc in ("1", "10"):
        rows = {r["metric"]: r for r in saved["correlations_by_ipc"][ipc]}
        assert rows["om_acc"]["spearman"] == pytest.approx(1.0) and rows["om_acc"]["n"] == 3
