"""Hostile files: every loader of a file a user hands the toolkit refuses a crafted pickle in one line
naming the file, and nothing in the file runs. The crafted object's ``__reduce__`` returns
``(pathlib.Path.touch, (marker,))``: unpickling it with ``torch.load(weights_only=False)`` would create
``marker`` (checked in the first test), so "no marker" means no code from the file ran.

Also the user-facing checks of the same issue: an expert buffer of another training-set size is
used with a warning (another image shape or class count is refused); a bare ``images_*.pt`` is
evaluated with assumed labels and a warning naming the labels file; an output flag under a file is
one line before any data is loaded."""
import json
import logging
import os
import pathlib
import pickle
import shutil

import pytest
import torch

import data
import utils
from pretrained import buffers, experts, originals, scores
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
    path = evil(tmp_path / "last.pt", marker, {"version": utils.CHECKPOINT_VERSION, "iteration": 3})
    with pytest.raises(utils.UserError) as error:
        utils.load_checkpoint(path)
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
    return str(root), evil(path, marker, originals.read_checkpoint(str(path)))


def test_original_model_checkpoint(pretrained_copy):
    root, path = pretrained_copy
    loaders = [lambda: originals.read_checkpoint(path),
               lambda: originals.load_original_models(root, "Tiny3", "ConvNetW32", 2),
               lambda: originals.load_pool(root, "Tiny3", ["ConvNetW32"], 2, CPU),  # CLoM, evaluate --assess
               lambda: originals.load_pool(root, "Tiny3", ["ConvNetW32"], None, CPU, epoch=2),
               lambda: originals.collect_summary(os.path.dirname(os.path.dirname(path)))]
    for load in loaders:
        with pytest.raises(utils.UserError) as error:
            load()
        one_line_refusal(error, path, "original-model checkpoint ")


def test_clom_pool_through_the_add_on(pretrained_copy):
    import methods
    from cli import clom as cli_clom
    from methods.addons import clom

    root, path = pretrained_copy
    settings = cli_clom.settings_from_flags(["10"], None, model="ConvNetW32", model_num=2, pretrained_path=root)
    cfg = methods.DistillConfig(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=1, clom=settings.as_dict())
    with pytest.raises(utils.UserError) as error:
        clom.CLoM.load_shared(cfg.clom, cfg, tiny_record(), CPU)
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
@pytest.fixture
def fake_dataset(monkeypatch):
    record = tiny_record()
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    return record


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
    path = evil(run / "last.pt", marker, {"version": utils.CHECKPOINT_VERSION})
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
    assert len(err) == 1 and "assuming class-major labels, 1 per class" in err[0]
    assert str(tmp_path / "labels_5000.pt") in err[0]


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
