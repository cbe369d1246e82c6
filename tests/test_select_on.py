"""``distill.py --select_on test|val`` (issue "Fidelity, round three", item 7): the best-so-far set
of each experiment is chosen on the mean over the evaluation models, of test accuracy (default)
or of the accuracy on a class-balanced validation split held out of the training set and of
distillation; the split is recorded and the chosen set's test accuracy reported."""
import csv
import json

import pytest
import torch

import evaluation
import methods
import utils
from cli import distill_flags
from data import split_validation
from methods.runner import DistillationRun, RunOptions, run_distillation
from sets import files
from tiny_data import CPU, MTT_MODEL, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = (MTT_MODEL, "MLP")


def _dm(record, iterations=3):
    return methods.DistillConfig(method="DM", dataset=record.name, model=MTT_MODEL, ipc=1, iterations=iterations,
                                 lr_img=1.0, batch_real=8, init="real", dsa_strategy="")


def _opts(run_dir, **changes):
    return RunOptions(**{**dict(num_exp=1, num_eval=2, eval_it=1, eval_models=MODELS, epoch_eval_train=2,
                                run_dir=str(run_dir), save_vis=False), **changes})


def test_validation_split_is_class_balanced_disjoint_and_seeded():
    record = tiny_record(per_class=10)
    rest, split = split_validation(record, 3, seed=5)
    assert split.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3  # class-major, 3 of every class
    assert torch.equal(record.labels_train[split.indices], split.labels)
    assert torch.equal(record.images_train[split.indices], split.images)
    kept = sorted(set(range(30)) - set(split.indices.tolist()))
    assert torch.equal(rest.images_train, record.images_train[kept]) and rest.labels_train.bincount().tolist() == [7] * 3
    assert torch.equal(rest.images_test, record.images_test)
    again = split_validation(record, 3, seed=5)[1]
    other = split_validation(record, 3, seed=6)[1]
    assert torch.equal(again.indices, split.indices) and again.record() == split.record()
    assert not torch.equal(other.indices, split.indices) and other.record()["indices_sha256"] != split.record()["indices_sha256"]
    assert split.record() == {"per_class": 3, "count": 9, "seed": 5, "indices_sha256": split.record()["indices_sha256"]}
    for bad in (0, 10):
        with pytest.raises(ValueError, match=f"--val_per_class {bad}: expected 1 to 9"):
            split_validation(record, bad, seed=0)


def test_evaluation_tests_the_same_networks_on_the_validation_split():
    record = tiny_record()
    images, labels = record.images_train[::8], record.labels_train[::8]
    test = (record.images_test, record.labels_test)
    for stacked in ("off", "on"):
        cfg = evaluation.EvalConfig(epochs=2, batch_train=4, stacked_eval=stacked)
        plain = evaluation.evaluate_synset(images, labels, MTT_MODEL, 3, *test, cfg, num_eval=2, seed=3, progress=False)
        with_val = evaluation.evaluate_synset(images, labels, MTT_MODEL, 3, *test, cfg, num_eval=2, seed=3,
                                              progress=False, val=test)
        assert with_val.accs == plain.accs and plain.val_accs == []  # test accuracies unchanged
        assert with_val.val_accs == with_val.accs  # the validation split here is the test set itself
        assert with_val.path == ("stacked" if stacked == "on" else "sequential")
        assert "val_mean" in with_val.as_dict() and "val_mean" not in plain.as_dict()


def test_best_is_chosen_on_the_mean_over_models_of_test_or_validation_accuracy(tmp_path, monkeypatch):
    record = tiny_record()
    # evaluations at iterations 0, 1, 2, 3; the first model alone would pick 1, the test mean 2, the validation mean 3
    test_accs = {MTT_MODEL: [0.2, 0.8, 0.3, 0.1], "MLP": [0.2, 0.0, 0.6, 0.1]}
    val_accs = {MTT_MODEL: [0.1, 0.1, 0.1, 0.7], "MLP": [0.1, 0.9, 0.1, 0.7]}
    given = []  # the validation split each evaluation was given

    def fake(images, labels, model, num_classes, test_images, test_labels, cfg, *, num_eval=1, val=None, **kwargs):
        """Scripted accuracies of the k-th evaluation (models in order) instead of training."""
        k = len(given) // len(MODELS)
        given.append(val)
        return evaluation.EvalResult(model, accs=[test_accs[model][k]] * num_eval,
                                     val_accs=[val_accs[model][k]] * num_eval if val is not None else [])
    monkeypatch.setattr(evaluation, "evaluate_synset_sharded", fake)

    run_distillation(_dm(record), _opts(tmp_path / "test"), record, CPU)
    summary = json.load(open(tmp_path / "test" / "results.json"))
    (best,) = summary["best"]
    assert (best["iteration"], best["accuracy"], best["selected_on"]) == (2, pytest.approx(0.45), "test accuracy")
    assert best["models"] == list(MODELS) and "val_accuracy" not in best
    assert summary["selection"]["select_on"] == "test" and summary["selection"]["validation"] is None
    assert all(v is None for v in given)  # no split under test

    given.clear()
    run = DistillationRun(_dm(record), _opts(tmp_path / "val", select_on="val", val_per_class=4), record, CPU)
    outcome = run.run()
    summary = json.load(open(tmp_path / "val" / "results.json"))
    (best,) = summary["best"]
    assert outcome.best == summary["best"] and outcome.best_path == summary["best_file"]
    assert (best["iteration"], best["selected_on"]) == (3, "validation accuracy")
    assert best["val_accuracy"] == pytest.approx(0.7) and best["accuracy"] == pytest.approx(0.1)  # its test accuracy
    assert best["val_accs"] == {MTT_MODEL: [0.7, 0.7], "MLP": [0.7, 0.7]}
    # the split: class-balanced, given to every evaluation, out of what the method distils from, recorded
    split = run.validation
    assert split.labels.bincount().tolist() == [4, 4, 4]
    assert all(v is not None and torch.equal(v[0], split.images) for v in given)
    pool = run.sampler.images
    assert len(pool) == len(record.labels_train) - 12
    assert not (pool.flatten(1)[:, None] == split.images.flatten(1)[None]).all(-1).any()  # no held-out image
    assert summary["selection"]["validation"] == split.record() and split.record()["per_class"] == 4
    meta = files.load_results(outcome.result_path)["meta"]
    assert meta["validation"] == split.record()
    best_file = files.load_results(summary["best_file"])
    assert best_file["meta"]["selection"]["select_on"] == "val" and best_file["meta"]["best"][0]["iteration"] == 3
    rows = list(csv.DictReader(open(tmp_path / "val" / "summary.csv")))
    assert float(rows[-1]["val_acc_mean"]) == pytest.approx(0.7)


def test_select_on_val_end_to_end_and_its_refusals(tmp_path):
    record = tiny_record()
    opts = _opts(tmp_path / "run", eval_models=(MTT_MODEL,), num_eval=1, select_on="val", val_per_class=3)
    run_distillation(_dm(record, iterations=1), opts, record, CPU)
    summary = json.load(open(tmp_path / "run" / "results.json"))
    (best,) = summary["best"]
    assert len(best["val_accs"][MTT_MODEL]) == 1 and 0.0 <= best["val_accuracy"] <= 1.0
    # a resumed run must choose the same way
    with pytest.raises(utils.UserError, match="--select_on 'val' → 'test'"):
        run_distillation(_dm(record, iterations=1), _opts(tmp_path / "run", eval_models=(MTT_MODEL,), resume=True),
                         record, CPU)
    with pytest.raises(utils.UserError, match="--val_per_class 24: expected 1 to 23"):
        DistillationRun(_dm(record), _opts(tmp_path / "x", select_on="val", val_per_class=24), record, CPU)
    with pytest.raises(utils.UserError, match="--ipc 4 with --select_on val --val_per_class 21"):
        DistillationRun(methods.DistillConfig(method="DM", dataset=record.name, model=MTT_MODEL, ipc=4, iterations=1),
                        _opts(tmp_path / "y", select_on="val", val_per_class=21), record, CPU)


def test_flags_reach_the_run_options():
    args = distill_flags.parse_args(["--method", "DM", "--dataset", "FashionMNIST", "--select_on", "val",
                                     "--val_per_class", "5"])
    _, opts = distill_flags.resolve(args)
    assert (opts.select_on, opts.val_per_class) == ("val", 5)
    _, opts = distill_flags.resolve(distill_flags.parse_args(["--method", "DM", "--dataset", "FashionMNIST"]))
    assert (opts.select_on, opts.val_per_class) == ("test", 100)


def test_distill_script_holds_out_and_says_what_the_best_set_was_chosen_on(tmp_path, fake_dataset, capsys):
    import distill

    run_dir = tmp_path / "run"
    assert distill.main(["--method", "DM", "--dataset", "Tiny3", "--model", MTT_MODEL, "--ipc", "1", "--Iteration", "2",
                         "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "1", "--eval_it", "1",
                         "--run_dir", str(run_dir), "--device", "cpu", "--no-vis", "--select_on", "val",
                         "--val_per_class", "4"]) == 0
    printed = capsys.readouterr().out
    assert "best-so-far: " in printed and "chosen on validation accuracy, mean over 1 evaluation model(s)" in printed
    summary = json.load(open(run_dir / "results.json"))
    assert summary["run"]["select_on"] == "val" and summary["selection"]["validation"]["count"] == 12
