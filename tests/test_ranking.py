"""DD-Ranking's scores (sets/ranking.py): HLR, IOR, LRS and ARS against a worked example computed
by hand, the rows each score is taken from, and their place in evaluate.py's table, JSON and CSV."""
import json
import math

import pandas as pd
import pytest
import torch

import data
import evaluate
from sets import comparison, files, ranking
from tiny_data import tiny_record

E = math.e

# Worked example (accuracies as fractions, two evaluation runs, lambda = 0.5, percentage points):
#
#   whole real set, hard labels        mean 0.80
#   set, hard labels                   runs 0.79, 0.78
#   set, teacher labels                runs 0.81, 0.83
#   random real, teacher labels        runs 0.80, 0.80
#
# run 1: HLR = 80 - 79 = 1,  IOR = 81 - 80 = 1,  alpha = 0.5*1 - 0.5*1 = 0
#        LRS = (e^0 - e^-1) / (e - e^-1) = (e - 1) / (e^2 - 1) = 1 / (e + 1)          = 0.268941
# run 2: HLR = 80 - 78 = 2,  IOR = 83 - 80 = 3,  alpha = 0.5*3 - 0.5*2 = 0.5
#        LRS = (e^0.5 - e^-1) / (e - e^-1) = (1.648721 - 0.367879) / 2.350402          = 0.544945
# reported: HLR 1.5 (80 - mean 78.5), IOR 2 (mean 82 - 80), alpha 0.25,
#           LRS mean (0.268941 + 0.544945) / 2 = 0.406943, population std (0.544945 - 0.268941) / 2 = 0.138002
#
# ARS (one run): set 0.81 / random 0.80 with augmentation (gain +1), set 0.70 / random 0.72
# without (gain -2): beta = 0.5*1 + 0.5*(-2) = -0.5,
#        ARS = (e^-0.5 - e^-1) / (e - e^-1) = (0.606531 - 0.367879) / 2.350402          = 0.101537
LRS_RUN1 = 1 / (E + 1)
LRS_RUN2 = (math.exp(0.5) - math.exp(-1)) / (E - math.exp(-1))
ARS_EXAMPLE = (math.exp(-0.5) - math.exp(-1)) / (E - math.exp(-1))


def test_the_hand_values_of_the_worked_example():
    assert LRS_RUN1 == pytest.approx(0.268941, abs=1e-6)
    assert LRS_RUN2 == pytest.approx(0.544945, abs=1e-6)
    assert ARS_EXAMPLE == pytest.approx(0.101537, abs=1e-6)
    assert ranking.normalised_exp(-1.0) == pytest.approx(0.0) and ranking.normalised_exp(1.0) == pytest.approx(1.0)
    assert ranking.normalised_exp(-1e6) == pytest.approx(-math.exp(-1) / (E - math.exp(-1)))
    assert ranking.normalised_exp(1e6) == math.inf


def test_lrs_equals_the_worked_example():
    scores = ranking.label_robust_scores(0.80, [0.79, 0.78], [0.81, 0.83], [0.80, 0.80])
    assert scores["hlr"] == pytest.approx(1.5) and scores["ior"] == pytest.approx(2.0)
    assert scores["alpha"] == pytest.approx(0.25)
    assert scores["lrs"] == pytest.approx(0.406943, abs=1e-6)
    assert scores["lrs"] == pytest.approx((LRS_RUN1 + LRS_RUN2) / 2)
    assert scores["lrs_std"] == pytest.approx(0.138002, abs=1e-6)
    assert scores["pairing"] == "per run" and scores["runs"] == 2
    # lambda = 1 scores IOR alone: alpha per run 1 and 3
    only_ior = ranking.label_robust_scores(0.80, [0.79, 0.78], [0.81, 0.83], [0.80, 0.80], ranking.ScoreSettings(1.0))
    assert only_ior["lrs"] == pytest.approx((ranking.normalised_exp(1) + ranking.normalised_exp(3)) / 2)


def test_lrs_in_fractions_and_from_means_when_runs_do_not_pair():
    fraction = ranking.ScoreSettings(units="fraction")
    scores = ranking.label_robust_scores(0.80, [0.79, 0.78], [0.81, 0.83], [0.80, 0.80], fraction)
    # run 1 alpha 0, run 2 alpha 0.005 (the points divided by 100); HLR and IOR still shown in points
    assert scores["alpha"] == pytest.approx(0.0025) and scores["hlr"] == pytest.approx(1.5)
    assert scores["lrs"] == pytest.approx((LRS_RUN1 + ranking.normalised_exp(0.005)) / 2)
    # three random runs against two set runs: the mean accuracies are scored (alpha 0.5*2 - 0.5*1.5)
    means = ranking.label_robust_scores(0.80, [0.79, 0.78], [0.81, 0.83], [0.79, 0.80, 0.81])
    assert means["pairing"] == "means" and means["alpha"] == pytest.approx(0.25)
    assert means["lrs"] == pytest.approx(ranking.normalised_exp(0.25)) and means["lrs_std"] == 0.0
    missing = ranking.label_robust_scores(float("nan"), [0.79], [0.81], [0.80])
    assert missing["ior"] == pytest.approx(1.0) and math.isnan(missing["hlr"]) and math.isnan(missing["lrs"])


def test_ars_equals_the_worked_example():
    scores = ranking.augmentation_robust_scores([0.81], [0.80], [0.70], [0.72])
    assert scores["gain_aug"] == pytest.approx(1.0) and scores["gain_plain"] == pytest.approx(-2.0)
    assert scores["beta"] == pytest.approx(-0.5) and scores["ars"] == pytest.approx(ARS_EXAMPLE)
    assert math.isnan(ranking.augmentation_robust_scores([0.8], [0.7], [], [0.6])["ars"])


def test_settings_refuse_a_lambda_outside_the_unit_interval():
    with pytest.raises(ValueError, match="--lrs_lambda must lie in \\[0, 1\\]"):
        ranking.ScoreSettings(lrs_lambda=1.5)
    with pytest.raises(ValueError, match="--score_units"):
        ranking.ScoreSettings(units="percent")


def _row(name, kind, accs, ipc=1, labels="hard", augmented=True, path=None, method=None):
    return comparison.Row(name=name, kind=kind, ipc=ipc, method=method or kind, dataset="Tiny3", path=path,
                          labels=labels, augmented=augmented,
                          results={"ConvNet": {"mean": sum(accs) / len(accs), "std": 0.0, "accs": accs,
                                               "protocol": {"epochs": 3, "lr": 0.01, "labels": labels}}})


def _example_rows():
    """The worked example as comparison rows, with decoys of another ipc and another regime."""
    return [_row("set", "synthetic", [0.79, 0.78], path="s.pt", method="DM"),
            _row("set + teacher labels", "synthetic", [0.81, 0.83], labels="teacher", path="s.pt", method="DM"),
            _row("random", "random", [0.70, 0.70]),
            _row("random + teacher labels", "random", [0.80, 0.80], labels="teacher"),
            _row("random ipc 2 + teacher labels", "random", [0.10, 0.10], ipc=2, labels="teacher"),
            _row("whole dataset", "whole", [0.80], ipc=None)]


def test_row_scores_take_the_same_regime_the_sets_hard_row_and_the_whole_row():
    rows = _example_rows()
    teacher = ranking.row_scores(rows, rows[1], "ConvNet")
    assert teacher["ior"] == pytest.approx(2.0) and teacher["hlr"] == pytest.approx(1.5)
    assert teacher["lrs"] == pytest.approx((LRS_RUN1 + LRS_RUN2) / 2)
    hard = ranking.row_scores(rows, rows[0], "ConvNet")  # IOR against random with hard labels: 78.5 - 70
    assert hard["ior"] == pytest.approx(8.5) and hard["hlr"] == pytest.approx(1.5) and math.isnan(hard["ars"])
    assert all(math.isnan(v) for v in ranking.row_scores(rows, rows[3], "ConvNet").values())  # a reference row


def test_row_scores_ars_from_the_rows_without_augmentation():
    rows = [_row("set", "synthetic", [0.81], path="s.pt"), _row("random", "random", [0.80]),
            _row("set (no aug)", "synthetic", [0.70], path="s.pt", augmented=False),
            _row("random (no aug)", "random", [0.72], augmented=False)]
    assert ranking.row_scores(rows, rows[0], "ConvNet")["ars"] == pytest.approx(ARS_EXAMPLE)
    plain = ranking.row_scores(rows, rows[2], "ConvNet")  # the plain row: IOR against the plain random row
    assert plain["ior"] == pytest.approx(-2.0) and math.isnan(plain["ars"])


def test_scores_in_the_long_table_csv_json_and_printed_table(tmp_path):
    rows = _example_rows()
    frame = comparison.long_table(rows, ["ConvNet"]).set_index("name")
    assert frame.loc["set + teacher labels", "regime"] == "teacher"
    assert frame.loc["set + teacher labels", "lrs"] == pytest.approx((LRS_RUN1 + LRS_RUN2) / 2)
    assert math.isnan(frame.loc["random + teacher labels", "hlr"])
    json_path, csv_path = comparison.write_table(str(tmp_path / "t.json"), rows, ["ConvNet"], {"scores": {}})
    csv = pd.read_csv(csv_path).set_index("name")
    assert csv.loc["set + teacher labels", "hlr"] == pytest.approx(1.5)
    assert csv.loc["set + teacher labels", "lrs"] == pytest.approx(0.406943, abs=1e-6)
    back = comparison.rows_from_json(json.loads(open(json_path).read()))
    assert [(row.labels, row.augmented) for row in back] == [(row.labels, row.augmented) for row in rows]
    printed = comparison.format_scores(rows, ["ConvNet"])
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in printed.splitlines()[2:-1]]
    assert ["set + teacher labels", "ConvNet", "1.50", "+2.00", "0.4069 ± 0.1380"] in cells
    assert "ARS" not in printed.splitlines()[0]
    assert comparison.format_scores(rows[:4], ["ConvNet"]) == ""  # no whole row: nothing beyond IOR


def test_without_augmentation_switches_off_every_training_augmentation():
    import augment
    import evaluation

    cfg = evaluation.EvalConfig(epochs=7, dsa_strategy="color_crop", dc_aug=augment.DCAugParam(strategy="crop_noise"))
    plain = comparison.without_augmentation(cfg)
    assert plain.dsa_strategy == "" and plain.dc_aug is None and plain.epochs == 7
    assert plain.describe()["augmentation"] == "none"


def _fake_set(path, record, ipc, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(record.num_classes * ipc, record.channel, *record.im_size, generator=g)
    labels = torch.arange(record.num_classes).repeat_interleave(ipc)
    files.save_results(str(path), [[images, labels]], {}, meta={"method": "A", "dataset": "Tiny3",
                                                               "dsa_strategy": "color_crop"})


def test_evaluate_reports_hlr_lrs_and_ars(tmp_path, monkeypatch, capsys, one_thread):
    record = tiny_record(num_classes=2, per_class=6, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    _fake_set(tmp_path / "a.pt", record, 1, 0)
    originals = tmp_path / "orig" / "Tiny3" / "original" / "ConvNet"
    originals.mkdir(parents=True)
    (originals / "summary.json").write_text(json.dumps({"models": [{"finished": True, "test_acc": 0.75}]}))
    out = tmp_path / "table.json"
    code = evaluate.main(["--dataset", "Tiny3", "--syn_path", str(tmp_path / "a.pt"), "--models", "ConvNet",
                          "--num_eval", "2", "--epoch_eval_train", "1", "--device", "cpu", "--ars",
                          "--lrs_lambda", "0.25", "--original_path", str(tmp_path / "orig"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random real ipc 1 (no aug)" in printed and "a.pt) (no aug)" in printed and "| HLR " in printed
    blob = json.loads(out.read_text())
    assert blob["comparison"]["protocol"]["scores"] == {"lrs_lambda": 0.25, "ars_lambda": 0.5, "units": "points"}
    rows = comparison.rows_from_json(blob)
    assert [(row.kind, row.augmented) for row in rows] == [("synthetic", True), ("synthetic", False),
                                                            ("random", True), ("random", False), ("whole", True)]
    assert rows[1].results["ConvNet"]["protocol"]["augmentation"] == "none"
    assert rows[0].results["ConvNet"]["protocol"]["augmentation"] == "DSA color_crop"
    set_aug, set_plain, rdm_aug, rdm_plain = (rows[i].results["ConvNet"]["accs"] for i in range(4))
    csv = pd.read_csv(tmp_path / "table.csv")
    first = csv.iloc[0]
    expected = ranking.label_robust_scores(0.75, set_aug, set_aug, rdm_aug, ranking.ScoreSettings(0.25))
    assert first["hlr"] == pytest.approx(expected["hlr"], abs=1e-4)
    assert first["lrs"] == pytest.approx(expected["lrs"], abs=1e-6)
    ars = ranking.augmentation_robust_scores(set_aug, rdm_aug, set_plain, rdm_plain)["ars"]
    assert first["ars"] == pytest.approx(ars, abs=1e-6)


def test_evaluate_refuses_a_lambda_outside_the_unit_interval(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--baseline", "random", "--ipc", "1", "--dataset", "MNIST", "--lrs_lambda", "2"])
    assert stop.value.code == 2
    assert "--lrs_lambda must be in [0, 1], got 2" in capsys.readouterr().err


# ----- label regimes and the teacher (sets/label_regimes.py, cli/evaluate_regimes.py) -------------

def _linear_teacher(num_classes=3, pixels=64):
    from pretrained.teachers import Teacher

    torch.manual_seed(0)
    return Teacher(networks=[torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, num_classes))])


def test_label_inputs_of_each_regime():
    import dataclasses

    import evaluation
    from sets import label_regimes

    teacher, images = _linear_teacher(), torch.randn(6, 1, 8, 8)
    soft_labels = torch.randn(6, 3)
    cfg = evaluation.EvalConfig(epochs=2, batch_train=4)
    hard = label_regimes.label_inputs(cfg, images, soft_labels, teacher)
    assert hard.labels is soft_labels and hard.extra == {} and hard.kind is None
    online = label_regimes.label_inputs(dataclasses.replace(cfg, labels="teacher"), images, soft_labels, teacher)
    assert torch.equal(online.labels, soft_labels.argmax(1)) and online.extra["teacher"] is teacher
    per_image = label_regimes.label_inputs(dataclasses.replace(cfg, labels="soft"), images, torch.arange(6) % 3, teacher)
    assert torch.allclose(per_image.labels, teacher(images)) and per_image.extra == {}
    crops = label_regimes.label_inputs(dataclasses.replace(cfg, labels="soft", student_aug="rrc"), images,
                                       torch.arange(6) % 3, teacher, seed=3)
    store = crops.extra["soft_store"]
    assert len(store.epochs) == evaluation.student_epochs(cfg) and crops.mb_per_epoch == store.mb_per_epoch > 0
    with pytest.raises(ValueError, match="--labels teacher needs a teacher"):
        label_regimes.label_inputs(dataclasses.replace(cfg, labels="teacher"), images, soft_labels)


def _teacher_set(path, record, teacher_record, ipc=2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(record.num_classes * ipc, record.channel, *record.im_size, generator=g)
    labels = torch.arange(record.num_classes).repeat_interleave(ipc)
    files.save_results(str(path), [[images, labels]], {}, meta={"method": "RDED", "dataset": record.name, "ipc": ipc,
                                                               "dsa_strategy": "", "teacher": teacher_record})


def _recorded_teacher(pretrained, record):
    from pretrained import teachers

    spec = teachers.TeacherSpec(models=("ConvNetW32",), directory=pretrained)
    return teachers.load_teacher(spec, device="cpu", dataset=record.name, num_classes=record.num_classes,
                                 channel=record.channel, im_size=record.im_size)


def test_evaluate_replays_the_recorded_teacher_under_every_regime(pretrained, tmp_path, monkeypatch, capsys,
                                                                  one_thread):
    record = tiny_record(per_class=6)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    _teacher_set(tmp_path / "a.pt", record, _recorded_teacher(pretrained, record).record)
    out = tmp_path / "t.json"
    common = ["--dataset", "Tiny3", "--syn_path", str(tmp_path / "a.pt"), "--models", "ConvNetW32", "--num_eval", "1",
              "--epoch_eval_train", "1", "--device", "cpu", "--original_path", str(tmp_path / "none")]
    assert evaluate.main([*common, "--out", str(out)]) == 0  # no teacher flag: the recorded one
    printed = capsys.readouterr().out
    assert "teacher: ConvNetW32" in printed and "random real ipc 2 + teacher labels" in printed
    rows = comparison.rows_from_json(json.loads(out.read_text()))
    assert [(row.kind, row.labels) for row in rows] == [
        ("synthetic", "hard"), ("synthetic", "soft"), ("synthetic", "teacher"),
        ("random", "hard"), ("random", "soft"), ("random", "teacher")]
    protocols = [row.results["ConvNetW32"]["protocol"] for row in rows]
    assert [p["labels"] for p in protocols[3:]] == ["hard", "soft (teacher logits per image)", "teacher (online)"]
    assert protocols[2]["label_regime"] == "teacher" and "label_regime" not in protocols[0]
    csv = pd.read_csv(tmp_path / "t.csv").set_index("name")
    teacher_row = next(name for name in csv.index if name.startswith("RDED") and name.endswith("+ teacher labels"))
    expected = 100 * (rows[2].results["ConvNetW32"]["mean"] - rows[5].results["ConvNetW32"]["mean"])
    assert csv.loc[teacher_row, "ior"] == pytest.approx(expected, abs=1e-4)
    # relabel stores under crop views: the storage per epoch is recorded beside the accuracies
    assert evaluate.main([*common, "--label_regimes", "soft", "--student_aug", "rrc", "--out", str(out)]) == 0
    rows = comparison.rows_from_json(json.loads(out.read_text()))
    assert [row.labels for row in rows] == ["soft", "soft"]
    for row in rows:
        protocol = row.results["ConvNetW32"]["protocol"]
        assert protocol["labels"] == "soft (teacher, per crop and epoch)" and protocol["soft_labels_mb_per_epoch"] > 0


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_a_missing_or_mismatched_teacher_is_one_line(pretrained, tmp_path, monkeypatch, capsys):
    record = tiny_record(per_class=6)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    common = ["--dataset", "Tiny3", "--models", "ConvNetW32", "--num_eval", "1", "--epoch_eval_train", "1",
              "--device", "cpu"]
    teacher_record = _recorded_teacher(pretrained, record).record
    changed = json.loads(json.dumps(teacher_record))
    changed["networks"][0]["sha256"] = "0" * 64
    _teacher_set(tmp_path / "changed.pt", record, changed)
    assert "differs from the recorded one" in _refused([*common, "--syn_path", str(tmp_path / "changed.pt")], capsys)
    moved = json.loads(json.dumps(teacher_record))
    moved["spec"]["directory"] = str(tmp_path / "elsewhere")
    _teacher_set(tmp_path / "moved.pt", record, moved)
    line = _refused([*common, "--syn_path", str(tmp_path / "moved.pt")], capsys)
    assert line.startswith("error: the teacher recorded with the set") and "train_original.py" in line
    assert "needs a teacher" in _refused([*common, "--baseline", "random", "--ipc", "1", "--label_regimes",
                                          "teacher"], capsys)
    two = tiny_record(num_classes=2, per_class=6)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: two)
    line = _refused([*common, "--baseline", "random", "--ipc", "1", "--teacher_model", "ConvNetW32",
                     "--teacher_dir", pretrained], capsys)
    assert "has 3 classes but Tiny3 has 2" in line


def test_sets_under_different_protocols_are_refused_naming_only_the_fields_that_differ():
    import evaluation

    dm = evaluation.EvalProtocol(dsa_strategy="color_crop", optimizer="adamw")
    sre2l = evaluation.EvalProtocol(dsa_strategy="", optimizer="adamw")
    assert comparison.common_protocol([dm, dm]) == dm
    with pytest.raises(ValueError) as refused:
        comparison.common_protocol([dm, sre2l, dm])
    message = str(refused.value)
    assert "dsa_strategy: 'color_crop' vs ''" in message
    assert "optimizer" not in message and "epochs_plain" not in message
