"""Outputs the references write (issue "Fidelity", item 8).

1. The best-so-far set: every run with evaluations keeps, per experiment, the set of highest test
   accuracy, mean over the evaluation models (what mtt-distillation and DATM report as
   Max_Accuracy; ``tests/test_select_on.py`` tests the mean and ``--select_on val``) in
   ``best_{tag}.pt`` beside the final result, listed apart in ``results.json``; it survives a stop
   and ``--resume``.
2. The trajectory-matching layout: MTT and DATM runs also write ``logged_files/exp{e}/``
   ``images_best.pt``, ``labels_best.pt``, ``lr_best.pt`` and ``images_{it}.pt`` etc. every
   ``--save_every`` iterations (GeorgeCazenavette/mtt-distillation, NUS-HPC-AI-Lab/DATM
   ``distill.py``), and ``evaluate.py --syn_path DIR`` reads such a directory back.
3. ``evaluate.py --syn_path DIR`` with no protocol flag trains such logged files as those references
   do: DSA, 1000 epochs, the learned step size (one warning line where none is recorded).
"""
import dataclasses
import json
import logging
import os
import re

import pytest
import torch

import cli
import methods
import storage
import utils
from data import ZCA
from methods.runner import DistillationRun, RunInterrupted, RunOptions, StopFlag, run_distillation
from sets import files
from tiny_data import CPU, MTT_MODEL, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(record, iterations=4):
    return methods.DistillConfig(method="DM", dataset=record.name, model=MTT_MODEL, ipc=1, iterations=iterations,
                                 lr_img=1.0, batch_real=8, init="noise", dsa_strategy="")


def _opts(run_dir, **changes):
    return RunOptions(**{**dict(num_exp=1, num_eval=1, eval_it=1, eval_models=(MTT_MODEL,), epoch_eval_train=2,
                                run_dir=str(run_dir), save_vis=False), **changes})


def _snapshotting(run):
    """Record the images each evaluation sees, by iteration."""
    seen, evaluate = {}, run.evaluate

    def recording(method, syn, exp, iteration, *args):
        seen[iteration] = syn.images.detach().cpu().clone()
        return evaluate(method, syn, exp, iteration, *args)
    run.evaluate = recording
    return seen


def test_best_set_is_kept_beside_the_final_one(tmp_path):
    record = tiny_record()
    run = DistillationRun(_dm(record), _opts(tmp_path / "run", num_exp=2), record, CPU)
    seen = _snapshotting(run)
    outcome = run.run()
    final = files.load_results(outcome.result_path)
    best = files.load_results(str(tmp_path / "run" / f"best_DM_{record.name}_{MTT_MODEL}_1ipc.pt"))
    summary = json.load(open(tmp_path / "run" / "results.json"))
    assert len(best["data"]) == len(final["data"]) == 2
    for exp in range(2):
        rows = [r for r in run.summary_rows if r["exp"] == exp]
        top = max(r["acc_mean"] for r in rows)
        first_top = next(r["iteration"] for r in rows if r["acc_mean"] == top)
        record_ = best["meta"]["best"][exp]
        assert (record_["iteration"], record_["accuracy"], record_["selected_on"]) == (first_top, top, "test accuracy")
        assert summary["best"][exp] == record_
        if exp == 1:  # the snapshots of the last experiment overwrote the first's
            assert torch.equal(best["data"][exp][0], seen[first_top])
    # the final set stays the headline: results.json's accuracy is the final evaluation's
    assert final["accs_all_exps"][MTT_MODEL] == summary["accuracy"][MTT_MODEL]["accs"]
    assert summary["best_file"].endswith(f"best_DM_{record.name}_{MTT_MODEL}_1ipc.pt")
    # evaluate.py --syn_path RUN_DIR still reads the final result only
    assert files.expand_syn_paths([str(tmp_path / "run")]) == [outcome.result_path]


def test_no_best_without_evaluation(tmp_path):
    record = tiny_record()
    run_distillation(_dm(record, iterations=1), _opts(tmp_path / "run", num_eval=0), record, CPU)
    summary = json.load(open(tmp_path / "run" / "results.json"))
    assert summary["best"] == [None] and summary["best_file"] is None
    assert not any(name.startswith("best_") for name in os.listdir(tmp_path / "run"))


def test_best_survives_a_stop_and_resume(tmp_path):
    record = tiny_record()
    stop = StopFlag()

    def stop_at_2(exp, iteration, logs):
        stop.requested = stop.requested or iteration == 2

    opts = _opts(tmp_path / "run", resume=True)
    with pytest.raises(RunInterrupted):
        run_distillation(_dm(record), opts, record, CPU, stop=stop, on_iteration=stop_at_2)
    checkpoint = tmp_path / "run" / "last.pt"
    saved = storage.load_checkpoint(str(checkpoint))
    assert saved["iteration"] == 2 and saved["best"][0]["iteration"] in (0, 1, 2)
    # A best no later evaluation can beat: the resumed run must report it, not forget it (``score`` is
    # what the choice compares: here the test accuracy, mean over the evaluation models).
    saved["best"][0].update(iteration=1, accuracy=2.0, score=2.0)
    marker = saved["best"][0]["data"][0] = torch.full_like(saved["best"][0]["data"][0], 7.0)
    saved.pop("version")
    storage.save_checkpoint(str(checkpoint), **saved)
    run_distillation(_dm(record), opts, record, CPU)
    best = files.load_results(str(tmp_path / "run" / f"best_DM_{record.name}_{MTT_MODEL}_1ipc.pt"))
    assert (best["meta"]["best"][0]["iteration"], best["meta"]["best"][0]["accuracy"]) == (1, 2.0)
    assert torch.equal(best["data"][0][0], marker)
    assert json.load(open(tmp_path / "run" / "results.json"))["best"][0]["iteration"] == 1


@pytest.mark.parametrize("method", ["MTT", "DATM"])
def test_trajectory_matching_layout_round_trips_through_evaluate(buffer_root, tmp_path, method, monkeypatch,
                                                                  capsys, caplog):
    import evaluate

    record = tiny_record()
    if method == "MTT":  # a ZCA the run applies to nothing: only images_zca_{it}.pt uses it
        record = dataclasses.replace(record, zca=ZCA.fit(record.images_train))
    extra = dict(buffer_path=buffer_root, syn_steps=2, expert_epochs=1, max_start_epoch=3)
    if method == "DATM":
        extra.update(threshold=100.0)
    cfg = methods.DistillConfig(method=method, dataset=record.name, model=MTT_MODEL, ipc=1, iterations=4,
                                lr_img=100.0, init="real", dsa_strategy="", extra=extra)
    run = DistillationRun(cfg, _opts(tmp_path / "run", eval_it=2, save_every=2), record, CPU)
    seen = _snapshotting(run)
    outcome = run.run()
    logged = tmp_path / "run" / "logged_files" / "exp0"
    best = files.load_results(str(tmp_path / "run" / f"best_{method}_{record.name}_{MTT_MODEL}_1ipc.pt"))
    final = files.load_results(outcome.result_path)
    best_it = best["meta"]["best"][0]["iteration"]
    names = {"images_best.pt", "labels_best.pt", "lr_best.pt"} | {f"{kind}_{it}.pt" for kind in ("images", "labels", "lr")
                                                                   for it in (0, 2, 4)}
    if method == "MTT":
        names |= {f"images_zca_{it}.pt" for it in (0, 2, 4)}
    assert set(os.listdir(logged)) == names
    load = lambda name: torch.load(logged / name, weights_only=True)
    for it in (0, 2, 4):
        assert torch.equal(load(f"images_{it}.pt"), seen[it])
    if method == "MTT":
        assert torch.allclose(load("images_zca_2.pt"), record.zca.inverse(seen[2]))
    assert torch.equal(load("images_4.pt"), final["data"][0][0]) and torch.equal(load("labels_4.pt"), final["data"][0][1])
    assert float(load("lr_4.pt")) == pytest.approx(final["meta"]["syn_lr"][0])
    assert torch.equal(load("images_best.pt"), seen[best_it]) and torch.equal(load("images_best.pt"), best["data"][0][0])
    assert torch.equal(load("labels_best.pt"), best["data"][0][1])
    assert load("labels_best.pt").shape == ((3, 3) if method == "DATM" else (3,))
    assert float(load("lr_best.pt")) == pytest.approx(best["meta"]["syn_lr"][0])

    # evaluate.py --syn_path DIR: images_best.pt with the labels and lr beside it, said in one INFO line
    from cli import evaluate_flags
    with caplog.at_level(logging.INFO, logger="sets.files"):
        _, (experiment,) = evaluate_flags.read_experiments(str(logged), record)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "sets.files"]
    assert line == f"--syn_path {logged}: the MTT/DATM/PAD layout: images_best.pt with labels_best.pt and lr_best.pt beside it"
    assert torch.equal(experiment.images, best["data"][0][0])
    labels = best["data"][0][1]
    assert torch.equal(experiment.labels, torch.softmax(labels, 1) if method == "DATM" else labels)
    assert experiment.learned_lr == pytest.approx(best["meta"]["syn_lr"][0])
    monkeypatch.setattr(cli, "load_record", lambda *args, **kwargs: record)
    assert evaluate.main(["--dataset", record.name, "--syn_path", str(logged), "--models", MTT_MODEL, "--num_eval", "1",
                          "--epoch_eval_train", "1", "--no-random_baseline", "--device", "cpu"]) == 0
    assert "%" in capsys.readouterr().out


def test_a_directory_without_sets_is_one_line(tmp_path):
    with pytest.raises(utils.UserError, match=re.escape("a directory without res_*.pt or images_best.pt")):
        files.expand_syn_paths([str(tmp_path)])


# 3. MTT/DATM/PAD's logged files are evaluated under those references' protocol (issue "Fidelity, round
#    three", item 1): DSA, 1000 epochs, the learned step size, unless flags say otherwise.

REFERENCE_DSA = "color_crop_cutout_flip_scale_rotate"


def _logged(folder, record, lr=None, name="best"):
    images = torch.randn(record.num_classes, record.channel, *record.im_size, generator=torch.Generator().manual_seed(1))
    files.write_logged(str(folder), name, images, torch.arange(record.num_classes),
                       None if lr is None else torch.tensor(lr))
    return str(folder)


def _load(record, argv):
    from cli import evaluate_flags
    args = evaluate_flags.build_parser().parse_args(["--dataset", record.name, *argv])
    saved, experiments, protocol = evaluate_flags.load_set(args.syn_path[0], args, record)
    cfg = protocol.resolve(record.name, MTT_MODEL, MTT_MODEL, saved.ipc, experiments[0].learned_lr)
    return saved, protocol, cfg


def test_logged_files_default_to_the_references_protocol(tmp_path, caplog):
    record = tiny_record()
    with_lr = _logged(tmp_path / "datm", record, lr=0.037)
    with caplog.at_level(logging.WARNING):
        saved, protocol, cfg = _load(record, ["--syn_path", with_lr])
    assert saved.is_reference_log and not caplog.records  # the learned step size is there: nothing to say
    assert (protocol.dsa_strategy, protocol.epochs_augmented, protocol.batch_train) == (REFERENCE_DSA, 1000, 256)
    assert (cfg.epochs, cfg.dsa_strategy, cfg.lr) == (1000, REFERENCE_DSA, pytest.approx(0.037))
    # a bare images_{tag}.pt takes the lr_{tag}.pt beside it
    _logged(tmp_path / "bare", record, lr=0.021, name="300")
    _, _, cfg = _load(record, ["--syn_path", str(tmp_path / "bare" / "images_300.pt")])
    assert (cfg.epochs, cfg.dsa_strategy, cfg.lr) == (1000, REFERENCE_DSA, pytest.approx(0.021))

    # MTT's own directory: no lr file, so one warning says which lr is used and how to give another
    mtt = _logged(tmp_path / "mtt", record)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, protocol, cfg = _load(record, ["--syn_path", mtt])
    (line,) = [r.getMessage() for r in caplog.records]
    assert "no learned step size" in line and "lr 0.01" in line and "--lr_net" in line and "--lr_path" in line
    assert (cfg.epochs, cfg.dsa_strategy, cfg.lr) == (1000, REFERENCE_DSA, 0.01)

    # explicit flags still override every field, and --lr_net silences the line
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, _, cfg = _load(record, ["--syn_path", mtt, "--lr_net", "0.2", "--epoch_eval_train", "7",
                                   "--dsa_strategy", "flip", "--batch_train", "2"])
    assert not caplog.records and (cfg.epochs, cfg.dsa_strategy, cfg.lr, cfg.batch_train) == (7, "flip", 0.2, 2)
    _, _, cfg = _load(record, ["--syn_path", with_lr, "--lr_net", "0.2"])
    assert cfg.lr == 0.2
    _, _, cfg = _load(record, ["--syn_path", mtt, "--lr_path", str(tmp_path / "datm" / "lr_best.pt")])
    assert cfg.lr == pytest.approx(0.037)

    # the DC family's res_*.pt keep the DC protocol (no augmentation here: 300 epochs, lr 0.01)
    dc = tmp_path / f"res_DC_{record.name}_{MTT_MODEL}_1ipc.pt"
    torch.save({"data": [[torch.randn(3, 1, 8, 8), torch.arange(3)]], "accs_all_exps": {}}, dc)
    saved, protocol, _ = _load(record, ["--syn_path", str(dc)])
    assert not saved.is_reference_log and protocol == __import__("evaluation").EvalProtocol()


def test_evaluate_with_no_flag_trains_a_logged_directory_with_dsa_1000_epochs_and_the_learned_lr(
        tmp_path, monkeypatch, capsys):
    import evaluate
    import evaluation
    from evaluation import runner

    record = dataclasses.replace(tiny_record(), name="CIFAR10")  # --dataset's default, tiny data
    logged = _logged(tmp_path / "logged_files" / "exp0", record, lr=0.037)
    monkeypatch.setattr(cli, "load_record", lambda *args, **kwargs: record)
    trained = []
    real_evaluate = runner.evaluate_synset

    def one_epoch(images, labels, model, num_classes, test_images, test_labels, cfg, **kwargs):
        """Record the configuration networks get and train them for one epoch of it (seconds)."""
        trained.append(cfg)
        return real_evaluate(images, labels, model, num_classes, test_images, test_labels,
                             dataclasses.replace(cfg, epochs=1), **kwargs)
    monkeypatch.setattr(runner, "evaluate_synset", one_epoch)
    monkeypatch.setattr(evaluation, "evaluate_synset", one_epoch)
    out = tmp_path / "out.json"
    assert evaluate.main(["--syn_path", logged, "--out", str(out)]) == 0
    # the set and the random-real row under the same protocol; the set at its learned step size
    assert {cfg.epochs for cfg in trained} == {1000} and {cfg.dsa_strategy for cfg in trained} == {REFERENCE_DSA}
    assert trained[0].lr == pytest.approx(0.037) and {cfg.lr for cfg in trained[1:]} == {0.01}  # random: 5 draws
    recorded = json.loads(out.read_text())["ConvNet"]["protocol"]
    assert recorded["epochs"] == 1000 and recorded["augmentation"] == f"DSA {REFERENCE_DSA}"
    assert recorded["lr"] == pytest.approx(0.037)
    assert "exp0" in capsys.readouterr().out
