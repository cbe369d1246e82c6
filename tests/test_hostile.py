"""Hostile and mistaken inputs (issue "Trust"): every case is generated here, none runs code from a
file, none ends in a traceback.

1. Hostile files: every loader of a file a user hands the toolkit refuses a crafted pickle in one
   line naming the file, and nothing in the file runs. The crafted object's ``__reduce__`` returns
   ``(pathlib.Path.touch, (marker,))``: unpickling it with ``torch.load(weights_only=False)`` would
   create ``marker`` (checked in the first test), so "no marker" means no code from the file ran.
   Also: an expert buffer of another training-set size is used with a warning (another image shape
   or class count is refused); a bare ``images_*.pt`` is evaluated with assumed labels and a
   warning naming the labels file; an output flag under a file is one line before any data loads.
2. Nothing finished is lost: a finished run is never overwritten; a failed write keeps the previous
   file; stale temporaries are removed; ``--resume`` grows ``--Iteration`` and names every refused
   difference old → new; a stop during an evaluation and a kill during a checkpoint write resume
   bit-exactly; a failed final write says where the results are.
3. Every mistake is one line: YAML types, ``--data_path``, broken sets, trajectory-matching
   booleans, SIGTERM in every stage (saying how to continue, also in ``log.txt``).
"""
import json
import logging
import os
import pathlib
import pickle
import shutil

import pytest
import torch

import data
import methods
import evaluation
import storage
import utils
from methods.runner import RunOptions, run_distillation
from pretrained import buffers, experts, original_files, originals, scores
from sets import files
from tiny_data import CPU, MTT_MODEL, build_mtt, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")

NOT_PLAIN = "is not plain data: it holds objects other than tensors and plain values"


class Touch:
    """Unpickles as ``pathlib.Path.touch(marker)``: a stand-in for ``os.system``."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "code from a hostile file ran"


def evil(path, marker, layout=None, legacy=False):
    """``torch.save`` ``layout`` (a dict by default) with a :class:`Touch` in it at ``path``."""
    if isinstance(layout, dict) or layout is None:
        payload = {**(layout or {}), "payload": Touch(marker)}
    else:
        payload = [*layout, Touch(marker)]
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def one_line_refusal(error, path, prefix=""):
    message = str(error.value)
    assert "\n" not in message and f"{prefix}{path} {NOT_PLAIN}" in message, message


def tiny_set(record, ipc=1):
    return record.images_train[::record.images_train.shape[0] // (record.num_classes * ipc)][:record.num_classes * ipc]


# ----- the crafted file is real ---------------------------------------------------------------
def test_the_crafted_file_would_run_code_if_loaded_unsafely(tmp_path):
    ran = tmp_path / "ran-on-purpose"
    path = evil(tmp_path / "evil.pt", ran)
    torch.load(path, weights_only=False)
    assert ran.exists()


def test_load_plain_names_the_file_and_what_it_references(tmp_path, marker):
    path = evil(tmp_path / "x.pt", marker)
    with pytest.raises(data.PlainDataError) as error:
        data.load_plain(path, "thing")
    one_line_refusal(error, path, "thing ")
    assert "a reference to getattr" in str(error.value)  # how pickle names Path.touch
    legacy = evil(tmp_path / "legacy.pt", marker, legacy=True)  # torch's pre-1.6 format
    with pytest.raises(data.PlainDataError, match=f"{legacy} {NOT_PLAIN}"):
        data.load_plain(legacy)
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:50])
    with pytest.raises(data.PlainDataError, match=r"cannot read thing .*cut.pt \(.*zip"):
        data.load_plain(tmp_path / "cut.pt", "thing")


# ----- synthetic sets ----------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
def test_result_file(tmp_path, marker, legacy):
    from cli import evaluate_flags

    record = tiny_record()
    layout = {"data": [[tiny_set(record), torch.arange(3)]], "accs_all_exps": {}}
    path = evil(tmp_path / "res_DM_Tiny3_ConvNet_1ipc.pt", marker, layout, legacy)
    with pytest.raises(utils.UserError) as error:
        files.load_results(path)
    one_line_refusal(error, path, "--syn_path: ")
    with pytest.raises(utils.UserError) as error:
        evaluate_flags.read_experiments(path, record)
    one_line_refusal(error, path, "--syn_path: ")


@pytest.mark.parametrize("hostile,flag", [("images_best.pt", "--syn_path"), ("labels_best.pt", "--labels_path"),
                                          ("lr_best.pt", "--lr_path")])
def test_trajectory_matching_tensor_files(tmp_path, marker, hostile, flag):
    record = tiny_record()
    torch.save(tiny_set(record), tmp_path / "images_best.pt")
    torch.save(torch.arange(3), tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.01), tmp_path / "lr_best.pt")
    path = evil(tmp_path / hostile, marker, [torch.zeros(1)])
    with pytest.raises(utils.UserError) as error:
        files.read_set_file(str(tmp_path / "images_best.pt"), 3, str(tmp_path / "labels_best.pt"),
                            str(tmp_path / "lr_best.pt"))
    one_line_refusal(error, path, f"{flag}: ")


def test_reference_layouts_still_load(tmp_path):
    """DC/DSA/DM res_*.pt (list data, float accuracies), MTT/DATM tensor logs with soft labels."""
    record = tiny_record()
    images = tiny_set(record, ipc=2)
    torch.save({"data": [[images, torch.arange(3).repeat_interleave(2)]], "accs_all_exps": {"ConvNet": [0.5]}},
               tmp_path / "res_DC_Tiny3_ConvNet_2ipc.pt")
    assert files.load_results(str(tmp_path / "res_DC_Tiny3_ConvNet_2ipc.pt"))["accs_all_exps"] == {"ConvNet": [0.5]}
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(torch.randn(6, 3), tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.02), tmp_path / "lr_best.pt")
    blob = files.read_set_file(str(tmp_path / "images_best.pt"), 3, str(tmp_path / "labels_best.pt"),
                               str(tmp_path / "lr_best.pt"))
    assert blob["data"][0][1].shape == (6, 3) and blob["meta"]["syn_lr"] == [pytest.approx(0.02)]


# ----- checkpoints, buffers, scores, original models ---------------------------------------------
def test_distillation_checkpoint(tmp_path, marker):
    path = evil(tmp_path / "last.pt", marker, {"version": storage.CHECKPOINT_VERSION, "iteration": 3})
    with pytest.raises(utils.UserError) as error:
        storage.load_checkpoint(path)
    one_line_refusal(error, path, "--resume: checkpoint ")


@pytest.fixture
def buffer_copy(buffer_root, tmp_path):
    root = tmp_path / "buffers"
    shutil.copytree(buffer_root, root)
    return root, root / "Tiny3_NO_ZCA" / MTT_MODEL


def test_expert_buffer_file(buffer_copy, marker):
    root, directory = buffer_copy
    trajectories = torch.load(directory / "replay_buffer_0.pt", weights_only=True)
    path = evil(directory / "replay_buffer_0.pt", marker, trajectories)
    with pytest.raises(utils.UserError) as error:
        buffers.load_chunk(path)
    one_line_refusal(error, path, "expert buffer file ")
    with pytest.raises(utils.UserError) as error:
        buffers.load_buffer((str(root), "Tiny3", MTT_MODEL, False))
    one_line_refusal(error, path, "expert buffer file ")
    with pytest.raises(utils.UserError) as error:  # what MTT, DATM and PAD read
        build_mtt("MTT", str(root))
    one_line_refusal(error, path, "expert buffer file ")


def test_expert_buffer_file_read_when_continuing_a_buffer(tmp_path, marker):
    """buffer.py reopens a partly filled last chunk to append to it."""
    record = tiny_record()
    cfg = experts.ExpertConfig(dataset="Tiny3", model=MTT_MODEL, train_epochs=1, batch_train=8, dsa=False)
    directory = str(tmp_path / "Tiny3_NO_ZCA" / MTT_MODEL)
    experts.make_buffer(cfg, record, directory, 1, device=CPU, test_every=0, save_interval=2)
    path = evil(os.path.join(directory, "replay_buffer_0.pt"), marker,
                torch.load(os.path.join(directory, "replay_buffer_0.pt"), weights_only=True))
    with pytest.raises(utils.UserError) as error:
        experts.make_buffer(cfg, record, directory, 2, device=CPU, test_every=0, save_interval=2)
    one_line_refusal(error, path, "expert buffer file ")


def test_score_file(tmp_path, marker):
    record = tiny_record()
    path = evil(tmp_path / "scores" / "Tiny3_EL2N.pt", marker,
                {"order": [torch.arange(24) + 24 * c for c in range(3)], "labels": record.labels_train})
    with pytest.raises(utils.UserError) as error:
        scores.load_sort_order(path, record.labels_train, 3)
    one_line_refusal(error, path, "--sort_method: score file ")
    with pytest.raises(utils.UserError) as error:  # PAD's bare index tensor, by name
        scores.load_sort_order(evil(tmp_path / "data_indices" / "idx.pt", marker, [torch.arange(3)]),
                               record.labels_train, 3)
    one_line_refusal(error, str(tmp_path / "data_indices" / "idx.pt"), "--sort_method: score file ")


@pytest.fixture
def pretrained_copy(pretrained, tmp_path, marker):
    root = tmp_path / "pretrained_model"
    shutil.copytree(pretrained, root)
    path = root / "Tiny3" / "original" / "ConvNetW32" / "index_0" / "checkpoint.pt"
    return str(root), evil(path, marker, original_files.read_checkpoint(str(path)))


def test_original_model_checkpoint(pretrained_copy):
    root, path = pretrained_copy
    loaders = [lambda: original_files.read_checkpoint(path),
               lambda: original_files.load_original_models(root, "Tiny3", "ConvNetW32", 2),
               lambda: original_files.load_pool(root, "Tiny3", ["ConvNetW32"], 2, CPU),  # CLoM, evaluate --assess
               lambda: original_files.load_pool(root, "Tiny3", ["ConvNetW32"], None, CPU, epoch=2),
               lambda: original_files.collect_summary(os.path.dirname(os.path.dirname(path)))]
    for load in loaders:
        with pytest.raises(utils.UserError) as error:
            load()
        one_line_refusal(error, path, "original-model checkpoint ")


def test_clom_pool_through_the_add_on(pretrained_copy):
    import methods
    from methods.addons import clom

    root, path = pretrained_copy
    settings = clom.settings_from_flags(["10"], None, model="ConvNetW32", model_num=2, pretrained_path=root)
    cfg = methods.DistillConfig(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=1, addons={"CLoM": settings})
    with pytest.raises(utils.UserError) as error:
        clom.CLoM.load_shared(cfg.addons["CLoM"], cfg, tiny_record(), CPU)
    one_line_refusal(error, path, "original-model checkpoint ")


# ----- dataset files ------------------------------------------------------------------------------
def test_tinyimagenet_pt(tmp_path, marker):
    path = evil(tmp_path / "tinyimagenet.pt", marker, {"classes": ["a"], "images_train": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(data.DatasetError) as error:
        data.load_dataset("TinyImageNet", str(tmp_path))
    one_line_refusal(error, path, "TinyImageNet file ")


def test_cifar_batches_are_checked_before_unpickling(tmp_path, marker):
    """torchvision unpickles CIFAR's batches with pickle.load, after checking each file's md5."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({"data": Touch(marker), "labels": []}))
    with pytest.raises(data.DatasetError, match="corrupted"):
        data.load_dataset("CIFAR10", str(tmp_path))


# ----- through the scripts --------------------------------------------------------------------------
def exits_with_one_line(capsys, main, argv, needle):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.parametrize("name", ["res_DM_Tiny3_ConvNetW32_1ipc.pt", "images_best.pt"])
def test_evaluate_script(tmp_path, marker, fake_dataset, capsys, name):
    import evaluate

    path = evil(tmp_path / name, marker, {"data": [[tiny_set(fake_dataset), torch.arange(3)]]})
    exits_with_one_line(capsys, evaluate.main, ["--dataset", "Tiny3", "--syn_path", path, "--models", "ConvNetW32",
                                                "--num_eval", "1", "--epoch_eval_train", "1", "--device", "cpu"],
                        f"--syn_path: {path} {NOT_PLAIN}")


def test_continual_script(tmp_path, marker, fake_dataset, capsys):
    from scripts import continual

    path = evil(tmp_path / "res_DM_Tiny3_ConvNetW32_1ipc.pt", marker, {"data": [[tiny_set(fake_dataset), torch.arange(3)]]})
    exits_with_one_line(capsys, continual.main, ["--dataset", "Tiny3", "--syn_path", path, "--steps", "1",
                                                 "--baselines", "--model", "ConvNetW32", "--device", "cpu",
                                                 "--out", str(tmp_path / "cl.json")],
                        f"--syn_path: {path} {NOT_PLAIN}")


def test_distill_resume(tmp_path, marker, fake_dataset, capsys):
    import distill

    run = tmp_path / "run"
    path = evil(run / "last.pt", marker, {"version": storage.CHECKPOINT_VERSION})
    exits_with_one_line(capsys, distill.main, ["--method", "DM", "--dataset", "Tiny3", "--model", "ConvNetW32",
                                               "--ipc", "1", "--Iteration", "1", "--num_exp", "1", "--num_eval", "1",
                                               "--batch_real", "4", "--run_dir", str(run), "--resume", "--device",
                                               "cpu"],
                        f"--resume: checkpoint {path} {NOT_PLAIN}")


def test_buffer_script_sort_file(tmp_path, marker, fake_dataset, capsys):
    import buffer

    path = evil(tmp_path / "scores.pt", marker, {"order": [], "labels": fake_dataset.labels_train})
    exits_with_one_line(capsys, buffer.main, ["--dataset", "Tiny3", "--model", "ConvNetW32", "--buffer_path",
                                              str(tmp_path / "b"), "--sort_method", path, "--device", "cpu"],
                        f"--sort_method: score file {path} {NOT_PLAIN}")


def test_train_original_script(pretrained_copy, fake_dataset, capsys):
    import train_original

    root, path = pretrained_copy
    exits_with_one_line(capsys, train_original.main, ["--dataset", "Tiny3", "--model", "ConvNetW32", "--save_path",
                                                      root, "--num", "2", "--epochs", "2", "--device", "cpu"],
                        f"original-model checkpoint {path} {NOT_PLAIN}")


# ----- an expert buffer made on other data ----------------------------------------------------------
def _edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def test_buffer_of_another_training_set_size_is_used_with_a_warning(buffer_copy, caplog):
    root, directory = buffer_copy
    assert json.loads((directory / "manifest.json").read_text())["num_train"] == 72  # written by buffer.py
    _edit_manifest(directory, num_train=50000)
    with caplog.at_level(logging.WARNING, logger="pretrained.buffers"):
        build_mtt("MTT", str(root), load_all=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, though load_all reads the buffer twice
    assert str(directory) in warnings[0] and "num_train 50000 -> 72" in warnings[0]


def test_buffer_without_a_recorded_size_or_of_the_same_size_is_silent(buffer_copy, caplog):
    root, directory = buffer_copy
    with caplog.at_level(logging.WARNING, logger="pretrained.buffers"):
        build_mtt("DATM", str(root))
        _edit_manifest(directory, num_train=None)  # an older manifest: unknown
        build_mtt("PAD", str(root))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("changes,needle", [
    (dict(image_shape=[3, 8, 8]), "image_shape=[3, 8, 8] but this run's data has image_shape=[1, 8, 8]"),
    (dict(num_classes=10), "num_classes=10 but this run's data has num_classes=3"),
])
def test_buffer_of_another_image_shape_or_class_count_is_refused(buffer_copy, changes, needle):
    root, directory = buffer_copy
    _edit_manifest(directory, **changes)
    with pytest.raises(utils.UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_mtt("MTT", str(root))


def test_buffer_of_another_dataset_or_zca_is_refused(buffer_copy):
    root, directory = buffer_copy
    config = json.loads((directory / "manifest.json").read_text())["config"]
    _edit_manifest(directory, config={**config, "dataset": "CIFAR10"})
    with pytest.raises(utils.UserError, match="made with dataset='CIFAR10' but this run needs dataset='Tiny3'"):
        build_mtt("MTT", str(root))
    _edit_manifest(directory, config={**config, "zca": True})
    with pytest.raises(utils.UserError, match="made with zca=True"):
        build_mtt("MTT", str(root))


def test_continuing_a_buffer_on_another_training_set_size_warns(tmp_path, caplog):
    cfg = experts.ExpertConfig(dataset="Tiny3", model=MTT_MODEL, train_epochs=1, batch_train=8, dsa=False)
    directory = str(tmp_path / "Tiny3_NO_ZCA" / MTT_MODEL)
    experts.make_buffer(cfg, tiny_record(), directory, 1, device=CPU, test_every=0)
    with caplog.at_level(logging.WARNING, logger="pretrained.buffers"):
        experts.make_buffer(cfg, tiny_record(per_class=12), directory, 2, device=CPU, test_every=0)
    assert "trained on num_train 72 images, this run's training set has 36" in caplog.text


# ----- a bare image tensor ----------------------------------------------------------------------------
def test_bare_images_get_assumed_labels_with_a_warning(tmp_path, caplog):
    from cli import evaluate_flags

    record = tiny_record()
    images = tiny_set(record, ipc=2)
    path = tmp_path / "images_best.pt"
    torch.save(images, path)
    with caplog.at_level(logging.WARNING, logger="sets.files"):
        _, (experiment,) = evaluate_flags.read_experiments(str(path), record)
    assert torch.equal(experiment.labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"--syn_path {path} holds bare images without labels: assuming class-major labels, 2 per class" in line
    assert f"pass --labels_path {tmp_path / 'labels_best.pt'}" in line
    caplog.clear()
    torch.save(torch.tensor([2, 2, 1, 1, 0, 0]), tmp_path / "labels_best.pt")
    with caplog.at_level(logging.WARNING, logger="sets.files"):
        files.read_set_file(str(path), 3)
    assert "labels_best.pt lies beside it: pass --labels_path" in caplog.text
    caplog.clear()
    blob = files.read_set_file(str(path), 3, str(tmp_path / "labels_best.pt"))
    assert blob["data"][0][1].tolist() == [2, 2, 1, 1, 0, 0] and not caplog.records


def test_bare_images_warning_reaches_the_evaluate_script(tmp_path, fake_dataset, capsys):
    import evaluate

    torch.save(tiny_set(fake_dataset), tmp_path / "images_5000.pt")
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", str(tmp_path / "images_5000.pt"), "--models",
                          "ConvNetW32", "--num_eval", "1", "--epoch_eval_train", "1", "--no-random_baseline",
                          "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    # one line for the assumed labels, one for the step size MTT did not save (reference_outputs tests it)
    assert len(err) == 2 and "assuming class-major labels, 1 per class" in err[0]
    assert str(tmp_path / "labels_5000.pt") in err[0]
    assert "no learned step size" in err[1] and f"--lr_path {tmp_path / 'lr_5000.pt'}" in err[1]


def test_bare_images_not_divisible_by_the_classes_are_refused(tmp_path):
    record = tiny_record()
    torch.save(record.images_train[:7], tmp_path / "images_best.pt")
    with pytest.raises(utils.UserError, match=r"holds 7 images without labels, not a multiple of the 3 classes, .*"
                                              r"--labels_path .*labels_best.pt"):
        files.read_set_file(str(tmp_path / "images_best.pt"), 3)
    torch.save(torch.tensor([0, 1, 2, 0, 1, 2, 0]), tmp_path / "labels_best.pt")  # with labels any count is fine
    assert files.read_set_file(str(tmp_path / "images_best.pt"), 3, str(tmp_path / "labels_best.pt"))["data"][0][1].numel() == 7
    torch.save(torch.tensor([0, 1]), tmp_path / "labels_best.pt")
    with pytest.raises(utils.UserError, match=r"--labels_path: .* holds \(2,\) for the 7 images"):
        files.read_set_file(str(tmp_path / "images_best.pt"), 3, str(tmp_path / "labels_best.pt"))


# ----- outputs under a file -----------------------------------------------------------------------------
@pytest.mark.parametrize("script,argv,needle", [
    ("buffer", ["--buffer_path", "{file}"], "--buffer_path {file}: a file, not a directory"),
    ("buffer", ["--buffer_path", "{file}/sub"], "--buffer_path {file}/sub: {file} is a file, not a directory"),
    ("distill", ["--save_path", "{file}/sub"], "--save_path {file}/sub: {file} is a file, not a directory"),
    ("distill", ["--save_path", "{file}"], "--save_path {file}: a file, not a directory"),
    ("distill", ["--run_dir", "{file}"], "--run_dir {file}: a file, not a directory"),
    ("train_original", ["--save_path", "{file}/x"], "--save_path {file}/x: {file} is a file, not a directory"),
    ("score", ["--buffer_path", "{file}"], "--buffer_path {file}: a file, not a directory"),
])
def test_outputs_under_a_file_are_one_line_before_loading_data(tmp_path, capsys, monkeypatch, script, argv, needle):
    import buffer
    import distill
    import train_original
    from scripts import score

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the output was checked")

    monkeypatch.setattr(data, "load_dataset", no_data)
    taken = tmp_path / "taken"
    taken.write_text("x")
    mains = {"buffer": buffer.main, "distill": distill.main, "train_original": train_original.main, "score": score.main}
    exits_with_one_line(capsys, mains[script], ["--dataset", "MNIST", *[a.format(file=taken) for a in argv]],
                        needle.format(file=taken))


# ---- nothing finished is lost; every mistake is one line ------------------------------------------

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
    ("distill", ["--epoch_eval_train", "0"], "--epoch_eval_train must be >= 1"),
    ("evaluate", ["--baseline", "random", "--ipc", "1", "--epoch_eval_train", "0"], "--epoch_eval_train must be >= 1"),
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
    storage.save_checkpoint(path, iteration=1)
    real_save = torch.save

    def full_disk(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*last.pt \(.*PytorchStreamWriter failed.*\); the previous file is intact"):
        storage.save_checkpoint(path, iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert storage.load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.pt.tmp{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f"res.pt.tmp{os.getpid()}"
    mine.write_bytes(b"being written")
    assert storage.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
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
    stop, calls, real = StopFlag(), [], evaluation.evaluate_synset

    def signal_during_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop.requested = True  # what SIGINT / SIGTERM do while a network trains
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation.runner, "evaluate_synset", signal_during_the_second_evaluation)
    with pytest.raises(RunInterrupted, match="stopped during the evaluation of experiment 0, iteration 2"):
        run_distillation(_small(), _opts(tmp_path, "cut", **opts), record, CPU, stop=stop)
    saved = storage.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (saved["exp"], saved["iteration"], saved["pending_eval"]) == (0, 2, True)
    monkeypatch.setattr(evaluation.runner, "evaluate_synset", real)
    resumed = run_distillation(_small(), _opts(tmp_path, "cut", resume=True, **opts), record, CPU)
    _same_result(full, resumed)
    summary = [(r["exp"], r["iteration"]) for r in csv_rows(tmp_path / "cut" / "summary.csv")]
    assert summary == [(r["exp"], r["iteration"]) for r in csv_rows(tmp_path / "full" / "summary.csv")]


def csv_rows(path):
    import csv

    with open(path) as handle:
        return [{k: int(v) if k in ("exp", "iteration") else v for k, v in row.items()} for row in csv.DictReader(handle)]


KILL_DURING_THIRD_CHECKPOINT = """
import os, torch
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

    run_dir = str(tmp_path / "killed")
    script = KILL_DURING_THIRD_CHECKPOINT.format(run_dir=run_dir)
    # The toolkit is imported as installed; ``python -c`` finds tiny_data in its working directory.
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert died.returncode == 137, died.stderr[-2000:]
    left = sorted(os.listdir(run_dir))
    assert any(name.startswith("last.pt.tmp") for name in left)
    assert storage.load_checkpoint(os.path.join(run_dir, "last.pt"))["iteration"] == 2  # the previous one, intact
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


def test_a_missing_default_dataset_points_at_the_one_installed(tmp_path, capsys, monkeypatch):
    import distill

    monkeypatch.setattr("data.torchvision_sets.FASHION_MNIST_SYSTEM_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        distill.main(["--Iteration", "1", "--run_dir", str(tmp_path / "run")])  # --dataset CIFAR10, --data_path data
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CIFAR10 not found under 'data/'")
    assert err[0].endswith("Fashion-MNIST is installed on this machine: --dataset FashionMNIST runs without any file")
