"""Comparison tables: IOR, whole-dataset rows, evaluate.py's cross-architecture table, make_table."""
import json
import os

import pandas as pd
import pytest
import torch


import cli
from sets import comparison
import data
import evaluate
import networks
import evaluation
import utils
from sets import files
from tiny_data import tiny_record

from scripts import make_table  # noqa: E402


def test_eval_mode_m_expands_to_the_six_architectures():
    assert cli.resolve_eval_models("M", "ConvNet") == ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"]
    assert networks.get_eval_pool("C", "ConvNetD4") == ["ConvNetD4", "ConvNet"]
    with pytest.raises(utils.UserError, match="--eval_mode X"):
        cli.resolve_eval_models("X", "ConvNet")


def test_improvement_over_random_is_difference_of_means_in_points():
    assert comparison.improvement_over_random([0.5, 0.7], [0.4, 0.4]) == pytest.approx(20.0)
    assert comparison.improvement_over_random([0.3], [0.35, 0.45]) == pytest.approx(-10.0)
    assert str(comparison.improvement_over_random([], [0.1])) == "nan"


def _row(name, kind, ipc, accs_by_model, method=None):
    return comparison.Row(name=name, kind=kind, ipc=ipc, method=method or name, dataset="Tiny3",
                          results={m: {"mean": sum(a) / len(a), "std": float(torch.tensor(a).std(unbiased=False)),
                                       "accs": a, "protocol": {"epochs": 3, "augmentation": "none", "labels": "hard"}}
                                   for m, a in accs_by_model.items()})


def test_wide_table_cells_and_ior_only_against_same_ipc():
    rows = [_row("DM", "synthetic", 10, {"ConvNet": [0.6, 0.8], "MLP": [0.5, 0.5]}),
            _row("DC", "synthetic", 1, {"ConvNet": [0.3, 0.3]}),
            _row("random", "random", 10, {"ConvNet": [0.5, 0.5], "MLP": [0.45, 0.45]})]
    wide = comparison.wide_table(rows, ["ConvNet", "MLP"])
    assert wide.loc["DM", "ConvNet"] == "70.00 ± 10.00 (+20.00)"
    assert wide.loc["DM", "MLP"] == "50.00 ± 0.00 (+5.00)"
    assert wide.loc["DC", "ConvNet"] == "30.00 ± 0.00"  # no random row of ipc 1: no IOR
    assert wide.loc["DC", "MLP"] == "-"
    assert wide.loc["random", "ConvNet"] == "50.00 ± 0.00"


def test_whole_dataset_accuracy_reads_finished_models_only(tmp_path):
    directory = tmp_path / "Tiny3" / "original" / "ConvNet"
    directory.mkdir(parents=True)
    summary = {"config": {"epochs": 150, "lr": 0.01}, "models": [
        {"finished": True, "test_acc": 0.9}, {"finished": True, "test_acc": 0.8}, {"finished": False, "test_acc": 0.1}]}
    (directory / "summary.json").write_text(json.dumps(summary))
    found = comparison.whole_dataset_accuracy(str(tmp_path), "Tiny3", "ConvNet")
    assert found["mean"] == pytest.approx(0.85) and found["std"] == pytest.approx(0.05)
    assert found["protocol"]["epochs"] == 150
    assert comparison.whole_dataset_accuracy(str(tmp_path), "Tiny3", "MLP") is None


def _fake_set(path, record, ipc, method, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(record.num_classes * ipc, record.channel, *record.im_size, generator=g)
    labels = torch.arange(record.num_classes).repeat_interleave(ipc)
    files.save_results(str(path), [[images, labels]], {}, meta={"method": method, "dataset": "Tiny3", "dsa_strategy": ""})


def test_evaluate_prints_one_table_with_random_and_whole_rows(tmp_path, monkeypatch, capsys, one_thread):
    record = tiny_record(num_classes=2, per_class=6, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _fake_set(run_dir / "res_A_Tiny3_ConvNet_2ipc.pt", record, 2, "A", 0)
    _fake_set(tmp_path / "b.pt", record, 1, "B", 1)
    originals_dir = tmp_path / "orig" / "Tiny3" / "original" / "MLP"
    originals_dir.mkdir(parents=True)
    (originals_dir / "summary.json").write_text(json.dumps({"models": [{"finished": True, "test_acc": 0.75}]}))
    out = tmp_path / "table.json"
    code = evaluate.main(["--dataset", "Tiny3", "--syn_path", str(run_dir), str(tmp_path / "b.pt"), "--models", "MLP",
                          "ConvNet", "--num_eval", "2", "--epoch_eval_train", "2", "--device", "cpu",
                          "--original_path", str(tmp_path / "orig"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for needle in ("A ipc 2", "B ipc 1", "random real ipc 1", "random real ipc 2", "whole dataset", "75.00 ± 0.00"):
        assert needle in printed
    blob = json.loads(out.read_text())
    assert set(blob) == {"MLP", "ConvNet", "comparison"}  # first row's per-model keys kept for old readers
    rows = comparison.rows_from_json(blob)
    assert [row.kind for row in rows] == ["synthetic", "synthetic", "random", "random", "whole"]
    a, random2 = rows[0], next(r for r in rows if r.kind == "random" and r.ipc == 2)
    assert len(a.results["ConvNet"]["accs"]) == 2 and a.results["ConvNet"]["protocol"]["labels"] == "hard"
    assert a.results["ConvNet"]["protocol"]["epochs"] == random2.results["ConvNet"]["protocol"]["epochs"] == 2
    csv = pd.read_csv(tmp_path / "table.csv")
    ior = csv[(csv["method"] == "A") & (csv["model"] == "ConvNet")]["ior"].item()
    expected = 100 * (a.results["ConvNet"]["mean"] - random2.results["ConvNet"]["mean"])
    assert ior == pytest.approx(expected)


def test_evaluate_refuses_mixed_augmentation_without_dsa_strategy(tmp_path, monkeypatch, capsys):
    record = tiny_record(num_classes=2, per_class=4, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    _fake_set(tmp_path / "a.pt", record, 1, "A", 0)
    blob = files.load_results(str(tmp_path / "a.pt"))
    blob["meta"]["dsa_strategy"] = "color_crop"
    torch.save(blob, tmp_path / "b.pt")
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert error.value.code == 2
    assert "--dsa_strategy" in capsys.readouterr().err


def _write(path, blob):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(blob, handle)


def test_make_table_aggregates_fake_result_files(tmp_path, capsys):
    protocol = {"epochs": 300, "augmentation": "none", "lr": 0.01}
    for method, ipc, accs in (("DM", 10, [0.8, 0.6]), ("herding", 10, [0.5]), ("DM", 1, [0.4])):
        _write(str(tmp_path / f"{method}{ipc}" / "results.json"),
               {"method": method, "dataset": "FashionMNIST", "ipc": ipc, "iterations": 5,
                "accuracy": {"ConvNet": {"mean": sum(accs) / len(accs), "std": 0.0, "accs": accs}},
                "protocol": {"ConvNet": protocol}})
    # the sweep script's random.json beside a results.json: dataset and ipc come from the sibling
    _write(str(tmp_path / "DM10" / "random.json"), {"ConvNet": {"mean": 0.45, "std": 0.05, "accs": [0.4, 0.5],
                                                                 "protocol": protocol}})
    _write(str(tmp_path / "other.json"), {"unrelated": 1})
    table = make_table.aggregate(make_table.gather([str(tmp_path)]))
    assert len(table) == 4
    dm10 = table[(table["method"] == "DM") & (table["ipc"] == 10)].iloc[0]
    assert dm10["mean"] == pytest.approx(70.0) and dm10["std"] == pytest.approx(10.0) and dm10["n"] == 2
    assert dm10["ior"] == pytest.approx(25.0)
    herding = table[table["method"] == "herding"].iloc[0]
    assert herding["ior"] == pytest.approx(5.0)
    assert pd.isna(table[(table["method"] == "DM") & (table["ipc"] == 1)].iloc[0]["ior"])
    out_dir = tmp_path / "tables"
    assert make_table.main([str(tmp_path), "--out_dir", str(out_dir), "--original_path", str(tmp_path / "none")]) == 0
    markdown = (out_dir / "table.md").read_text()
    assert "70.00 ± 10.00 (+25.00)" in markdown and "45.00 ± 5.00" in markdown
    assert (out_dir / "FashionMNIST_acc_vs_ipc.png").stat().st_size > 1000
    assert len(pd.read_csv(out_dir / "table.csv")) == 4
    assert make_table.main([str(tmp_path / "missing")]) == 2


def test_assess_takes_exactly_one_set(capsys):
    """--assess refuses several sets with one line, before any data is loaded."""
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--assess", "--syn_path", "a.pt", "b.pt", "--dataset", "MNIST"])
    assert stop.value.code == 2
    assert "--assess takes one synthetic set (--syn_path), got 2" in capsys.readouterr().err


def test_make_table_keeps_clom_and_feature_label_runs_apart(tmp_path):
    """A CLoM run, a feature-label run (recorded in results.json, or only in config.yaml as older
    runs are) and the plain run of the same method and protocol are three columns, not one pool."""
    protocol = {"epochs": 300, "augmentation": "DC none", "lr": 0.01, "labels": "hard"}

    def run(name, acc, **extra):
        _write(str(tmp_path / name / "results.json"),
               {"method": "DC", "dataset": "FashionMNIST", "ipc": 1, "iterations": 5,
                "accuracy": {"ConvNet": {"mean": acc, "std": 0.0, "accs": [acc]}},
                "protocol": {"ConvNet": protocol}, **extra})

    run("plain", 0.6, clom=None, feature_labels=None)
    run("clom", 0.7, clom={"alphas": [100.0]}, feature_labels=None)
    run("feat_new", 0.8, clom=None, feature_labels={"lbd": 0.01})
    run("feat_old", 0.9, clom=None)  # older results.json: F only in config.yaml
    (tmp_path / "feat_old" / "config.yaml").write_text("distill:\n  method: DC\n  feature_labels:\n    lbd: 0.01\n")
    (tmp_path / "plain" / "config.yaml").write_text("distill:\n  method: DC\n  feature_labels: null\n")
    table = make_table.aggregate(make_table.gather([str(tmp_path)])).set_index("method")
    assert sorted(table.index) == ["DC", "DC+CLoM", "DC+F"]
    assert table.loc["DC", "mean"] == pytest.approx(60.0) and table.loc["DC+CLoM", "mean"] == pytest.approx(70.0)
    assert table.loc["DC+F", "mean"] == pytest.approx(85.0) and table.loc["DC+F", "n"] == 2
    assert make_table.short_augmentation("DSA color_crop_cutout_flip_scale_rotate") == "DSA"
    assert make_table.short_augmentation("DC none") == "no aug"
    assert make_table.short_augmentation("DSA color_crop") == "DSA color_crop"


def test_make_table_counts_a_copied_baseline_once(tmp_path):
    """The sweep copies one random.json beside every run that shares its protocol; pooled copies
    would weight that draw several times. Identical copies count once, a different draw is pooled."""
    protocol = {"epochs": 300, "augmentation": "DSA", "lr": 0.01}
    for name, acc in (("DM10", 0.8), ("MTT10", 0.81), ("herding10", 0.79)):
        _write(str(tmp_path / name / "results.json"),
               {"method": name[:-2], "dataset": "FashionMNIST", "ipc": 10, "iterations": 5,
                "accuracy": {"ConvNet": {"mean": acc, "std": 0.0, "accs": [acc]}}, "protocol": {"ConvNet": protocol}})
    for name in ("DM10", "MTT10"):  # two copies of one baseline
        _write(str(tmp_path / name / "random.json"), {"ConvNet": {"accs": [0.70, 0.72], "protocol": protocol}})
    _write(str(tmp_path / "herding10" / "random.json"), {"ConvNet": {"accs": [0.76], "protocol": protocol}})
    table = make_table.aggregate(make_table.gather([str(tmp_path)])).set_index("method")
    assert table.loc["random", "n"] == 3
    assert table.loc["random", "mean"] == pytest.approx(100 * (0.70 + 0.72 + 0.76) / 3)


def _protocol_row(name, kind, ipc, accs, **protocol):
    return comparison.Row(name=name, kind=kind, ipc=ipc, method=name, dataset="Tiny3",
                          results={"ConvNet": {"mean": sum(accs) / len(accs), "std": 0.0, "accs": accs,
                                               "protocol": {"epochs": 3, "lr": 0.01, "augmentation": "none",
                                                            "labels": "hard", **protocol}}})


def test_table_names_lr_and_labels_once_when_every_row_agrees():
    rows = [_protocol_row("DM", "synthetic", 1, [0.6]), _protocol_row("random", "random", 1, [0.5]),
            _protocol_row("whole dataset", "whole", None, [0.9], lr=0.05, labels=None)]
    wide = comparison.wide_table(rows, ["ConvNet"])
    assert list(wide.columns) == ["ConvNet"]  # narrow: the whole-dataset row's own lr does not count
    printed = comparison.format_table(rows, ["ConvNet"])
    assert printed.splitlines()[-1] == "every set and random row: lr 0.01, labels hard"


def test_table_shows_lr_and_labels_columns_when_rows_differ(tmp_path):
    rows = [_protocol_row("MTT", "synthetic", 1, [0.6, 0.7], lr=0.013, learned_lr=[0.0118, 0.013]),
            _protocol_row("DATM", "synthetic", 1, [0.65], lr=0.02, learned_lr=[0.02], labels="soft"),
            _protocol_row("DC+F", "synthetic", 1, [0.55], feature_labels_lbd=0.5),
            _protocol_row("random", "random", 1, [0.5]),
            _protocol_row("whole dataset", "whole", None, [0.9], lr=0.01, labels=None)]
    wide = comparison.wide_table(rows, ["ConvNet"])
    assert list(wide.columns) == ["lr", "labels", "ConvNet"]
    assert wide["lr"].tolist() == ["learned 0.0118-0.013", "learned 0.02", "0.01", "0.01", "0.01"]
    assert wide["labels"].tolist() == ["hard", "soft", "hard + feature labels (lbd 0.5)", "hard", "hard"]
    assert wide.loc["MTT", "ConvNet"] == "65.00 ± 0.00 (+15.00)"
    printed = comparison.format_table(rows, ["ConvNet"])
    assert "| lr " in printed and "| labels " in printed and "every set and random row" not in printed
    _, csv_path = comparison.write_table(str(tmp_path / "t.json"), rows, ["ConvNet"], {})
    csv = pd.read_csv(csv_path).set_index("name")
    assert csv.loc["MTT", "lr"] == pytest.approx(0.0124) and csv.loc["MTT", "lr_source"] == "learned"
    assert csv.loc["random", "lr"] == 0.01 and csv.loc["random", "lr_source"] == "fixed"
    assert csv.loc["DATM", "labels"] == "soft" and csv.loc["DC+F", "labels"] == "hard + feature labels (lbd 0.5)"


def test_only_the_differing_protocol_column_is_added():
    rows = [_protocol_row("DATM", "synthetic", 1, [0.65], labels="soft"), _protocol_row("random", "random", 1, [0.5])]
    assert list(comparison.wide_table(rows, ["ConvNet"]).columns) == ["labels", "ConvNet"]
    assert comparison.format_table(rows, ["ConvNet"]).splitlines()[-1] == "every set and random row: lr 0.01"


def test_evaluate_set_row_records_the_learned_step_sizes(monkeypatch):
    calls = []

    def fake_evaluate(images, labels, model, num_classes, test_images, test_labels, cfg, **kwargs):
        calls.append(cfg.lr)
        return evaluation.EvalResult(model, [0.5], 0.1)

    monkeypatch.setattr(evaluation.runner, "evaluate_synset", fake_evaluate)  # under evaluate_synset_sharded
    experiments = [comparison.SetToEvaluate(torch.zeros(2, 1, 8, 8), torch.arange(2), learned_lr=lr)
                   for lr in (0.011, 0.012)]
    row = comparison.Row(name="MTT", kind="synthetic", ipc=1, method="MTT", dataset="Tiny3")
    comparison.evaluate_set_row(row, experiments, ["ConvNet"], evaluation.EvalProtocol(lr=0.01), "ConvNet",
                                torch.zeros(2, 1, 8, 8), torch.arange(2), 2, num_eval=1, device=torch.device("cpu"),
                                seed=0)
    protocol = row.results["ConvNet"]["protocol"]
    assert calls == [0.011, 0.012] and protocol["learned_lr"] == [0.011, 0.012]
    assert comparison.lr_text(protocol) == "learned 0.011-0.012"
    assert comparison.training_lr(protocol) == (pytest.approx(0.0115), "learned")
    plain = comparison.Row(name="DM", kind="synthetic", ipc=1, method="DM", dataset="Tiny3")
    comparison.evaluate_set_row(plain, [comparison.SetToEvaluate(torch.zeros(2, 1, 8, 8), torch.arange(2))], ["ConvNet"],
                                evaluation.EvalProtocol(lr=0.01), "ConvNet", torch.zeros(2, 1, 8, 8), torch.arange(2), 2,
                                num_eval=1, device=torch.device("cpu"), seed=0)
    assert "learned_lr" not in plain.results["ConvNet"]["protocol"]
    assert comparison.lr_text(plain.results["ConvNet"]["protocol"]) == "0.01"
