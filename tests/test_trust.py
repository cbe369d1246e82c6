"""Files from others never run code; a finished run is never overwritten."""
import os

import pytest
import torch

import methods
import utils
from methods.runner import RunOptions, run_distillation
from sets import files
from tiny_data import CPU, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(record):
    return methods.DistillConfig(method="DM", dataset=record.name, model="ConvNetW32", ipc=1, iterations=1,
                                 batch_real=4, init="real", dsa_strategy="")


def test_a_finished_run_is_not_overwritten(tmp_path):
    record = tiny_record(per_class=8)
    opts = RunOptions(num_exp=1, num_eval=0, run_dir=str(tmp_path / "run"), save_vis=False)
    outcome = run_distillation(_dm(record), opts, record, CPU)
    before = files.load_results(outcome.result_path)["data"][0][0].clone()
    stamp = os.stat(outcome.result_path).st_mtime_ns
    with pytest.raises(utils.UserError, match="already holds a run .*add --resume to continue it, or choose another "
                                              "--run_dir"):
        run_distillation(_dm(record).replace(lr_img=5.0), opts, record, CPU)
    assert os.stat(outcome.result_path).st_mtime_ns == stamp
    assert torch.equal(files.load_results(outcome.result_path)["data"][0][0], before)
    # --resume on the finished run changes nothing either
    from dataclasses import replace
    again = run_distillation(_dm(record), replace(opts, resume=True), record, CPU)
    assert torch.equal(files.load_results(again.result_path)["data"][0][0], before)


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    record = tiny_record(per_class=8)
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(utils.UserError, match="--run_dir .*taken: a file, not a directory"):
        run_distillation(_dm(record), RunOptions(num_exp=1, num_eval=0, run_dir=str(path)), record, CPU)


@pytest.mark.parametrize("script,argv,message", [
    ("evaluate", ["--baseline", "random", "--ipc", "1", "--out", "/proc/nope/x.json"], "--out /proc/nope/x.json: cannot write there"),
    ("distill", ["--run_dir", "/proc/nope"], "--run_dir /proc/nope: cannot write there"),
    ("distill", ["--epoch_eval_train", "0"], "--epoch_eval_train must be at least 1"),
    ("evaluate", ["--baseline", "random", "--ipc", "1", "--epoch_eval_train", "0"], "--epoch_eval_train must be at least 1"),
])
def test_unwritable_outputs_are_refused_before_any_work(script, argv, message, capsys, monkeypatch):
    import distill
    import evaluate

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the output was checked")

    monkeypatch.setattr("data.load_dataset", no_data)
    with pytest.raises(SystemExit) as stop:
        {"distill": distill, "evaluate": evaluate}[script].main(["--dataset", "MNIST", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    utils.save_checkpoint(path, iteration=1)
    real_save = torch.save

    def full_disk(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*last.pt \(.*PytorchStreamWriter failed.*\); the previous file is intact"):
        utils.save_checkpoint(path, iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert utils.load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.pt.tmp{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f"res.pt.tmp{os.getpid()}"
    mine.write_bytes(b"being written")
    assert utils.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and mine.exists()


@pytest.mark.parametrize("text,key,expected", [
    ("resume: \"no\"\n", "resume", False), ("vis: \"false\"\n", "vis", False), ("resume: yes\n", "resume", True),
    ("lr_lr: 1e-7\n", "lr_lr", "1e-07"), ("ipc: 2.0\n", "ipc", 2),
])
def test_yaml_values_take_the_flags_types(tmp_path, text, key, expected):
    from cli import distill_flags

    path = tmp_path / "preset.yaml"
    path.write_text(f"method: MTT\ndataset: MNIST\n{text}")
    args = distill_flags.parse_args(["--config", str(path)])
    assert getattr(args, key) == expected or str(getattr(args, key)) == expected


@pytest.mark.parametrize("text,message", [
    ("ipc: 1.7\n", "ipc: 1.7 is not an integer"), ("resume: maybe\n", "resume: 'maybe' is not true or false"),
    ("num_eval: ten\n", "num_eval: 'ten' is not an integer"),
])
def test_yaml_values_of_the_wrong_type_are_one_line(tmp_path, text, message):
    from cli import distill_flags

    path = tmp_path / "preset.yaml"
    path.write_text(f"dataset: MNIST\n{text}")
    with pytest.raises(utils.UserError, match=message):
        distill_flags.parse_args(["--config", str(path)])


@pytest.mark.parametrize("make,message", [(lambda p: None, "no such directory"),
                                          (lambda p: p.write_text("x"), "a file, not a directory")])
def test_a_data_path_that_is_not_a_folder_is_refused(tmp_path, capsys, make, message):
    import evaluate

    path = tmp_path / "FashionMNSIT"
    make(path)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "FashionMNIST", "--data_path", str(path), "--baseline", "random", "--ipc", "1"])
    assert stop.value.code == 2
    assert f"--data_path {path}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("corrupt,message", [
    (lambda images, labels: labels.__setitem__(0, 7), "labels run 1..7; Tiny3 has classes 0..2"),
    (lambda images, labels: labels.__setitem__(0, -1), "labels run -1..2"),
    (lambda images, labels: images.__setitem__((0, 0, 0, 0), float("nan")), "images hold NaN or infinite values"),
])
def test_broken_sets_are_named_with_the_file(tmp_path, corrupt, message):
    from cli import evaluate_flags

    record = tiny_record(per_class=4)
    images, labels = record.images_train[::4].clone(), record.labels_train[::4].clone()
    corrupt(images, labels)
    path = str(tmp_path / "res_bad.pt")
    files.save_results(path, [[images, labels]], {})
    with pytest.raises(utils.UserError, match=message):
        evaluate_flags.read_experiments(path, record)


@pytest.mark.parametrize("argv,expected", [([], None), (["--no_aug"], True), (["--no_aug", "True"], True),
                                           (["--no_aug", "false"], False), (["--no-no_aug"], False),
                                           (["--load_all"], True), (["--Sequential_Generation", "False"], False)])
def test_trajectory_matching_booleans_take_no_value_or_the_reference_spelling(argv, expected):
    from cli import distill_flags

    args = distill_flags.parse_args(["--method", "DATM", "--dataset", "MNIST", *argv])
    name = (argv[0].lstrip("-").replace("no-", "", 1) if argv else "no_aug")
    assert getattr(args, name) is expected


# ---- resume: growing --Iteration, stops during evaluation and during a checkpoint write ----------
def _small(**kw):
    fields = dict(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=2, iterations=4, lr_img=1.0, batch_real=8,
                  batch_train=8, init="real", dsa_strategy="")
    fields.update(kw)
    return methods.DistillConfig(**fields)


def _opts(tmp_path, name, **kw):
    from dataclasses import replace

    return replace(RunOptions(num_exp=1, num_eval=1, eval_models=("ConvNetW32",), epoch_eval_train=2, seed=3,
                              run_dir=str(tmp_path / name), save_vis=False), **kw)


def _same_result(a, b):
    blob_a, blob_b = files.load_results(a.result_path), files.load_results(b.result_path)
    assert len(blob_a["data"]) == len(blob_b["data"])
    for (images_a, labels_a, *_), (images_b, labels_b, *_) in zip(blob_a["data"], blob_b["data"]):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert a.accs_all_exps == b.accs_all_exps


def test_resume_with_a_larger_iteration_continues_every_finished_experiment(tmp_path):
    record = tiny_record()
    direct = run_distillation(_small(iterations=4), _opts(tmp_path, "direct", num_exp=2), record, CPU)
    short = run_distillation(_small(iterations=2), _opts(tmp_path, "grown", num_exp=2), record, CPU)
    with pytest.raises(AssertionError):
        _same_result(direct, short)
    grown = run_distillation(_small(iterations=4), _opts(tmp_path, "grown", num_exp=2, resume=True), record, CPU)
    _same_result(direct, grown)
    assert files.load_results(grown.result_path)["meta"]["iterations"] == 4


def test_resume_names_each_refused_difference_old_to_new(tmp_path):
    record = tiny_record()
    run_distillation(_small(iterations=4), _opts(tmp_path, "run", num_eval=0), record, CPU)
    with pytest.raises(utils.UserError, match="--Iteration 4 → 2: a run can be extended, not shortened"):
        run_distillation(_small(iterations=2), _opts(tmp_path, "run", num_eval=0, resume=True), record, CPU)
    with pytest.raises(utils.UserError, match=r"other values \(--lr_img 1.0 → 5.0; --seed 3 → 4\); use the same flags "
                                              r"\(only --Iteration may grow\)"):
        run_distillation(_small(iterations=4, lr_img=5.0), _opts(tmp_path, "run", num_eval=0, resume=True, seed=4),
                         record, CPU)


def test_a_stop_during_evaluation_resumes_bit_exactly(tmp_path, monkeypatch):
    from methods.runner import RunInterrupted, StopFlag

    record = tiny_record()
    opts = dict(eval_it=2, num_exp=2)
    full = run_distillation(_small(), _opts(tmp_path, "full", **opts), record, CPU)
    stop, calls, real = StopFlag(), [], utils.evaluate_synset

    def signal_during_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop.requested = True  # what SIGINT / SIGTERM do while a network trains
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "evaluate_synset", signal_during_the_second_evaluation)
    with pytest.raises(RunInterrupted, match="stopped during the evaluation of experiment 0, iteration 2"):
        run_distillation(_small(), _opts(tmp_path, "cut", **opts), record, CPU, stop=stop)
    saved = utils.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (saved["exp"], saved["iteration"], saved["pending_eval"]) == (0, 2, True)
    monkeypatch.setattr(utils, "evaluate_synset", real)
    resumed = run_distillation(_small(), _opts(tmp_path, "cut", resume=True, **opts), record, CPU)
    _same_result(full, resumed)
    summary = [(r["exp"], r["iteration"]) for r in csv_rows(tmp_path / "cut" / "summary.csv")]
    assert summary == [(r["exp"], r["iteration"]) for r in csv_rows(tmp_path / "full" / "summary.csv")]


def csv_rows(path):
    import csv

    with open(path) as handle:
        return [{k: int(v) if k in ("exp", "iteration") else v for k, v in row.items()} for row in csv.DictReader(handle)]


KILL_DURING_THIRD_CHECKPOINT = """
import os, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
torch.set_num_threads(1)
import methods
from methods.runner import RunOptions, run_distillation
from tiny_data import CPU, tiny_record
writes = []
real_save = torch.save
def dying_save(obj, target, *args, **kwargs):
    if isinstance(obj, dict) and "syn" in obj and obj.get("iteration"):
        writes.append(obj["iteration"])
        if len(writes) == 3:
            with open(target, "wb") as handle:
                handle.write(b"half a checkpoint")
            os._exit(137)  # SIGKILL in the middle of the write
    return real_save(obj, target, *args, **kwargs)
torch.save = dying_save
cfg = methods.DistillConfig(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=2, iterations=4, lr_img=1.0,
                            batch_real=8, batch_train=8, init="real", dsa_strategy="")
run_distillation(cfg, RunOptions(num_exp=1, num_eval=1, eval_models=("ConvNetW32",), epoch_eval_train=2, seed=3,
                                 run_dir={run_dir!r}, save_vis=False, checkpoint_every=1), tiny_record(), CPU)
"""


def test_a_kill_during_a_checkpoint_write_resumes_bit_exactly(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = str(tmp_path / "killed")
    script = KILL_DURING_THIRD_CHECKPOINT.format(root=root, tests=os.path.join(root, "tests"), run_dir=run_dir)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert died.returncode == 137, died.stderr[-2000:]
    left = sorted(os.listdir(run_dir))
    assert any(name.startswith("last.pt.tmp") for name in left)
    assert utils.load_checkpoint(os.path.join(run_dir, "last.pt"))["iteration"] == 2  # the previous one, intact
    record = tiny_record()
    full = run_distillation(_small(), _opts(tmp_path, "full", checkpoint_every=1), record, CPU)
    resumed = run_distillation(_small(), _opts(tmp_path, "killed", checkpoint_every=1, resume=True), record, CPU)
    _same_result(full, resumed)
    assert not any(name.startswith("last.pt.tmp") for name in os.listdir(run_dir))


def test_results_json_records_seed_configuration_and_command(tmp_path):
    import json

    import distill

    run_dir = tmp_path / "cmd"
    argv = ["--method", "DM", "--dataset", "FashionMNIST", "--ipc", "1", "--Iteration", "1", "--num_eval", "0",
            "--batch_real", "4", "--model", "ConvNetW32", "--run_dir", str(run_dir), "--seed", "5", "--no-vis"]
    assert distill.main(argv) == 0
    record = json.loads((run_dir / "results.json").read_text())
    assert record["seed"] == 5 and record["config"]["batch_real"] == 4 and record["config"]["iterations"] == 1
    assert record["run"]["run_dir"] == str(run_dir) and record["command"].endswith(" ".join(argv[-6:]))
    assert "fashion-mnist" in record["data_source"].lower()


# ---- every stage says, on one line, what a stop kept and how to continue; errors go to log.txt ---
def _send_sigterm(*args, **kwargs):
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the stage")


@pytest.mark.parametrize("stage,target,message,log", [
    ("buffer", "pretrained.experts.make_buffer", "terminated (SIGTERM); 0 expert(s) are saved in {d}/MNIST_NO_ZCA/ConvNetW32; "
     "run the same command again to continue from the next expert", "MNIST_NO_ZCA/ConvNetW32/log.txt"),
    ("train_original", "pretrained.originals.train_originals", "terminated (SIGTERM); finished models and the last "
     "checkpoint are kept in {d}/MNIST/original/ConvNetW32; run the same command again to continue",
     "MNIST/original/ConvNetW32/log.txt"),
    ("evaluate", "sets.comparison.random_real_row", "terminated (SIGTERM); nothing was written; run the same "
     "command again", None),
])
def test_sigterm_in_every_stage_is_one_line_saying_how_to_continue(stage, target, message, log, tmp_path, capsys,
                                                                     monkeypatch):
    import importlib
    import signal

    module = importlib.import_module(stage)
    monkeypatch.setattr("cli.load_record", lambda *args, **kwargs: tiny_record(per_class=4))
    monkeypatch.setattr(target, _send_sigterm)
    argv = {"buffer": ["--buffer_path", str(tmp_path), "--num_experts", "1", "--train_epochs", "1"],
            "train_original": ["--save_path", str(tmp_path), "--num", "1", "--epochs", "1"],
            "evaluate": ["--baseline", "random", "--ipc", "1"]}[stage]
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        module.main(["--dataset", "MNIST", "--model", "ConvNetW32", *argv])
    assert stop.value.code == 130 and signal.getsignal(signal.SIGTERM) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: " + message.format(d=tmp_path)
    assert not any("Traceback" in line for line in err)
    if log:
        assert ("error: " + message.format(d=tmp_path)) in (tmp_path / log).read_text()


def test_distill_stopped_by_sigterm_says_resume_and_logs_it(tmp_path, capsys, monkeypatch):
    import signal

    import distill

    real = distill.run_distillation

    def sigterm_at_iteration_1(*args, **kwargs):
        kwargs["on_iteration"] = lambda exp, iteration, logs: os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr("cli.load_record", lambda *args, **kwargs: tiny_record(per_class=4))
    monkeypatch.setattr(distill, "run_distillation", sigterm_at_iteration_1)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "DM", "--dataset", "MNIST", "--model", "ConvNetW32", "--ipc", "1", "--Iteration", "3",
                      "--num_eval", "0", "--batch_real", "4", "--run_dir", str(run_dir)])
    assert stop.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: stopped at experiment 0, iteration 1; checkpoint ") and line.endswith(
        "re-run the same command with --resume to continue")
    assert line in (run_dir / "log.txt").read_text()


def test_a_failed_final_write_keeps_the_results_elsewhere(tmp_path, capsys, monkeypatch):
    import json

    import evaluate

    monkeypatch.setattr("cli.load_record", lambda *args, **kwargs: tiny_record(per_class=4))
    monkeypatch.setattr("cli.check_writable", lambda *args, **kwargs: None)  # the folder went away during the work
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "MNIST", "--model", "ConvNetW32", "--baseline", "random", "--ipc", "1",
                       "--num_eval", "1", "--epoch_eval_train", "1", "--out", "/proc/gone/acc.json"])
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --out /proc/gone/acc.json: cannot write /proc/gone/acc.")
    rescued = line.split("the results were written to ")[1].removesuffix(" instead")
    assert os.path.dirname(rescued) == str(tmp_path) and json.loads(open(rescued).read())["comparison"]["table"]


def test_a_failed_result_write_keeps_the_sets_in_the_checkpoint(tmp_path, monkeypatch):
    record = tiny_record(per_class=8)
    opts = RunOptions(num_exp=1, num_eval=0, run_dir=str(tmp_path / "run"), save_vis=False)
    real = files.save_results

    def full_disk(path, *args, **kwargs):
        raise OSError(f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(files, "save_results", full_disk)
    with pytest.raises(OSError, match=r"No space left on device\); the finished sets are kept in .*last.pt: make room "
                                      "and re-run the same command with --resume to write it"):
        run_distillation(_dm(record), opts, record, CPU)
    monkeypatch.setattr(files, "save_results", real)
    from dataclasses import replace

    outcome = run_distillation(_dm(record), replace(opts, resume=True), record, CPU)
    assert files.load_results(outcome.result_path)["data"][0][0].shape[0] == record.num_classes
