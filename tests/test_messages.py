"""True messages (issue "Trust, round two", item 5, and malformed-but-safe files): a NaN or
infinite value is named where it is (the synthetic images or labels and since when, an expert's
epoch in a buffer file, a tensor of ``last.pt``), a kept checkpoint is mentioned only when it is
on disk, and a malformed file that is safe to read (an empty ``lr_*.pt``, a checkpoint with broken
fields, an empty expert chunk, a dataset file without classes) is one line naming it, not a
traceback. Every file is generated here.
"""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import methods
import storage
import utils
from methods.run_checks import divergence_message, non_finite_parts
from methods.runner import RunOptions, run_distillation
from methods.synthetic import SyntheticSet
from pretrained import buffers
from tiny_data import CPU, MTT_MODEL, build_mtt, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    fields = dict(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=2, iterations=3, lr_img=1.0, batch_real=8,
                  batch_train=8, init="real", dsa_strategy="")
    fields.update(kw)
    return methods.DistillConfig(**fields)


def _opts(tmp_path, name="run", **kw):
    fields = dict(num_exp=1, num_eval=0, eval_models=("ConvNetW32",), epoch_eval_train=1, seed=3,
                  run_dir=str(tmp_path / name), save_vis=False)
    fields.update(kw)
    return RunOptions(**fields)


def _nan_in_initial_images(monkeypatch):
    dm = methods.get_method_class("DM")
    initial = dm.init_synthetic

    def poisoned(self):
        syn = initial(self)
        syn.images.data[0, 0, 0, 0] = float("nan")
        return syn

    monkeypatch.setattr(dm, "init_synthetic", poisoned)


def one_line(message):
    assert "\n" not in message, message
    return message


# ----- 1. a NaN or infinite loss names where the values are, and what is kept ----------------------------
def test_nan_in_the_initial_images_is_named_and_nothing_is_claimed_kept(tmp_path, monkeypatch):
    _nan_in_initial_images(monkeypatch)
    with pytest.raises(FloatingPointError) as error:
        run_distillation(_cfg(), _opts(tmp_path), tiny_record(), CPU)
    message = one_line(str(error.value))
    assert "iteration 1: the synthetic images (1 of 384 values) held NaN or infinite values from their " \
           "initialisation" in message, message
    assert "--lr_img" not in message and "nothing is kept" in message, message
    assert not (tmp_path / "run" / "last.pt").exists()


def test_images_that_diverge_in_an_update_suggest_lr_img_and_name_the_kept_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as error:
        run_distillation(_cfg(lr_img=1e38, iterations=4), _opts(tmp_path, checkpoint_every=1), tiny_record(), CPU)
    message = one_line(str(error.value))
    path = os.path.join(str(tmp_path / "run"), "last.pt")
    assert "the synthetic set was finite at the start and the loss was finite up to iteration" in message, message
    assert "an update made the synthetic images" in message and "(try a smaller --lr_img)" in message, message
    assert f"checkpoint {path} (experiment 0, iteration" in message and message.endswith("is kept"), message
    assert os.path.isfile(path)


def test_nan_labels_are_named_before_the_images():
    syn = SyntheticSet(torch.zeros(6, 1, 4, 4), SyntheticSet.class_major_labels(3, 2), 3, 2)
    syn.learn_soft_labels(torch.zeros(6, 3))
    assert non_finite_parts(syn) == []
    syn.label_logits.data[2, 1] = float("nan")
    syn.images.data[:] = float("inf")
    assert non_finite_parts(syn) == ["the soft-label logits (1 of 18 values)", "the synthetic images (96 of 96 values)"]
    message = divergence_message("DATM", 0, 5, float("nan"), syn, 5, non_finite_parts(syn), "the resumed checkpoint")
    assert message.startswith("DATM loss became nan at experiment 0, iteration 5: the soft-label logits (1 of 18 "
                              "values) and the synthetic images (96 of 96 values) held NaN or infinite values from "
                              "the resumed checkpoint"), message
    assert "--lr_img" not in message


def test_nan_in_the_real_images_is_named():
    syn = SyntheticSet(torch.zeros(3, 1, 4, 4), SyntheticSet.class_major_labels(3, 1), 3, 1)
    real = torch.zeros(9, 1, 4, 4)
    real[4, 0, 1, 1] = float("nan")
    message = divergence_message("DM", 1, 3, float("inf"), syn, 1, [], "their initialisation", real)
    assert "the real training images hold 1 NaN or infinite values" in message and "--lr_img" not in message


def test_distill_script_prints_where_and_what_is_kept_on_one_line(tmp_path, fake_dataset, capsys, monkeypatch):
    import cli
    import distill

    _nan_in_initial_images(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "DM", "--dataset", "Tiny3", "--model", "ConvNetW32", "--ipc", "1", "--Iteration",
                      "2", "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "1", "--batch_real", "4",
                      "--run_dir", str(run), "--device", "cpu"])
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("error")]  # beside the log's progress lines
    assert stop.value.code == cli.EXIT_NUMERIC and len(err) == 1 and "Traceback" not in text, text
    # The initial set is evaluated first: its evaluation names the images.
    assert err[0].startswith("error: evaluating the set of experiment 0 after iteration 0: evaluation training loss "
                             "became nan: NaN or infinite values in the synthetic images (1 of 192 values); no "
                             "checkpoint or result was written before it, so nothing is kept"), err
    assert "last checkpoint" not in err[0] and "--lr_img" not in err[0] and not (run / "last.pt").exists()


# ----- 1. NaN in an expert buffer: refused when the buffer is read -----------------------------------------
@pytest.fixture
def buffer_copy(buffer_root, tmp_path):
    import shutil

    root = tmp_path / "buffers"
    shutil.copytree(buffer_root, root)
    return root, root / "Tiny3_NO_ZCA" / MTT_MODEL


def test_nan_in_an_expert_buffer_names_the_file_expert_parameter_and_epoch(buffer_copy):
    root, directory = buffer_copy
    path = str(directory / "replay_buffer_0.pt")
    trajectories = torch.load(path, weights_only=True)
    trajectories[1][3][2][0] = float("nan")
    torch.save(trajectories, path)
    needle = (f"expert buffer file {path}: expert 1 (counting from 0 in this file) holds NaN or infinite values in "
              "parameter 2 at epoch 3")
    for read in (lambda: buffers.load_chunk(path), lambda: buffers.load_buffer(str(directory)),
                 lambda: build_mtt("MTT", str(root), load_all=True)):
        with pytest.raises(utils.UserError) as error:
            read()
        assert needle in one_line(str(error.value)), str(error.value)


def test_an_empty_expert_chunk_is_one_line(buffer_copy):
    root, directory = buffer_copy
    path = str(directory / "replay_buffer_0.pt")
    torch.save([], path)
    for read in (lambda: buffers.load_chunk(path), lambda: buffers.load_buffer(str(directory)),
                 lambda: build_mtt("MTT", str(root))):
        with pytest.raises(utils.UserError) as error:
            read()
        assert f"expert buffer file {path} holds no experts (an empty list)" in one_line(str(error.value))


# ----- 1 and 2. a checkpoint with NaN or broken fields on --resume -------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-iteration DM run; resuming it with --Iteration 4 restores its finished experiment."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finished")
    run_distillation(_cfg(iterations=2), _opts(root, "run"), tiny_record(), CPU)
    torch.set_num_threads(before)
    return root / "run"


def _edit(state, change):
    state = copy.deepcopy(state)
    change(state)
    return state


def _poison(state):
    state["finished"][0]["syn"]["images"][0, 0, 1, 2] = float("nan")


CHECKPOINT_CASES = [
    (lambda s: s.pop("config"), "has no 'config' field"),
    (lambda s: s.__setitem__("exp", "0"), "field 'exp' is a string, expected an integer"),
    (lambda s: s.__setitem__("data_save", {}), "field 'data_save' is a mapping, expected a list"),
    (lambda s: s.pop("accs_by_exp"), "has no 'accs_by_exp' field"),
    (lambda s: s["finished"].__setitem__(0, 7), "entry 0 of 'finished' is an integer, expected a mapping"),
    (lambda s: s["finished"][0]["syn"].__setitem__("images", torch.zeros(2)),
     "its synthetic set of experiment 0 cannot be restored (RuntimeError"),
    (lambda s: s["finished"][0].__setitem__("method", {"optimizer_img": {"state": {}}}),
     "its method state of experiment 0 cannot be restored (KeyError"),
    (lambda s: s["finished"][0].__setitem__("rng", {"python": 3}),
     "its random-number states of experiment 0 cannot be restored (TypeError"),
    (_poison, "holds NaN or infinite values in finished[0]['syn']['images'] (1 of 384 values)"),
]


@pytest.mark.parametrize("change,needle", CHECKPOINT_CASES)
def test_a_broken_or_nan_checkpoint_is_one_line_naming_last_pt(finished_run, tmp_path, change, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = storage.load_checkpoint(str(run / "last.pt"))
    storage.save_checkpoint(str(run / "last.pt"), **{k: v for k, v in _edit(saved, change).items() if k != "version"})
    with pytest.raises(utils.UserError) as error:
        run_distillation(_cfg(iterations=4), _opts(tmp_path, "run", resume=True), tiny_record(), CPU)
    message = one_line(str(error.value))
    assert message.startswith(f"--resume: {run / 'last.pt'}") and needle in message, message
    assert message.endswith("remove it to start again, or use another --run_dir"), message


def test_a_nan_checkpoint_through_distill_resume(finished_run, tmp_path, fake_dataset, capsys):
    import shutil

    import distill

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = storage.load_checkpoint(str(run / "last.pt"))
    storage.save_checkpoint(str(run / "last.pt"), **{k: v for k, v in _edit(saved, _poison).items() if k != "version"})
    with pytest.raises(SystemExit) as stop:
        distill.main(["--method", "DM", "--dataset", "Tiny3", "--model", "ConvNetW32", "--ipc", "2", "--Iteration",
                      "4", "--num_exp", "1", "--num_eval", "0", "--batch_real", "8", "--batch_train", "8", "--lr_img",
                      "1.0", "--init", "real", "--dsa_strategy", "", "--seed", "3", "--run_dir", str(run),
                      "--resume", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert f"--resume: {run / 'last.pt'} holds NaN or infinite values in finished[0]" in err[0], err


# ----- 2. an empty lr file, dataset files without classes or images ---------------------------------------
def test_an_empty_lr_file_is_one_line(tmp_path, fake_dataset, capsys):
    import evaluate

    torch.save(fake_dataset.images_train[::24][:3].clone(), tmp_path / "images_best.pt")
    torch.save(torch.arange(3), tmp_path / "labels_best.pt")
    torch.save(torch.zeros(0), tmp_path / "lr_empty.pt")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", str(tmp_path / "images_best.pt"), "--labels_path",
                       str(tmp_path / "labels_best.pt"), "--lr_path", str(tmp_path / "lr_empty.pt"), "--models",
                       "ConvNetW32", "--num_eval", "1", "--epoch_eval_train", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert f"--lr_path: {tmp_path / 'lr_empty.pt'} holds a torch.float32 tensor of shape (0,); expected the " \
           "learned step size, one number" in err[0], err


def _tiny_pt(folder, classes, labels_train):
    count = len(labels_train)
    torch.save({"classes": classes, "images_train": torch.zeros(count, 3, 4, 4, dtype=torch.uint8),
                "labels_train": labels_train, "images_val": torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                "labels_val": torch.zeros(1, dtype=torch.int64)}, folder / "tinyimagenet.pt")


@pytest.mark.parametrize("classes,labels,needle", [
    ([], torch.zeros(2, dtype=torch.int64), "'classes' must be a non-empty list of class names, got 0 names"),
    (["a", "b", "c"], torch.tensor([0, 1]), "1 of the 3 classes have no training image (c)"),
    (["a"], torch.tensor([0.0, 0.5]), "'labels_train' must be an integer tensor of 2 labels (one per image), "
                                      "got torch.float32 (2,)"),
])
def test_a_tinyimagenet_file_without_classes_or_images_of_a_class(tmp_path, classes, labels, needle):
    _tiny_pt(tmp_path, classes, labels)
    with pytest.raises(data.DatasetError) as error:
        data.load_dataset("TinyImageNet", str(tmp_path))
    assert needle in one_line(str(error.value)) and "tinyimagenet.pt" in str(error.value), str(error.value)


def _image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.mark.parametrize("layout,needle", [
    ({"train/n1/a.png": True, "train/n2": False, "val/images/n1/a.png": True},
     "could not index the images under '{root}/train/': Found no valid file for the classes n2"),
    ({"train": False, "val/images": False}, "Couldn't find any class folder in {root}/train"),
])
def test_an_image_folder_with_an_empty_class_or_no_class_is_one_line(tmp_path, layout, needle):
    for name, is_image in layout.items():
        _image(str(tmp_path / name)) if is_image else os.makedirs(tmp_path / name, exist_ok=True)
    with pytest.raises(data.DatasetError) as error:
        data.load_dataset("TinyImageNet", str(tmp_path))
    assert needle.format(root=tmp_path) in one_line(str(error.value)), str(error.value)


# ----- 3. assess_correlation.py --out: never an input, written atomically -----------------------------
def _assessed_runs(root, accuracies=(0.3, 0.5, 0.8)):
    import json

    for index, acc in enumerate(accuracies):
        run = root / f"run{index}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"accuracy": {"ConvNetW32": {"mean": acc, "accs": [acc]}}}))
        (run / f"res_{index}_assess.json").write_text(json.dumps({"metrics": {"om_acc": acc, "om_loss": 1 - acc}}))


@pytest.mark.parametrize("target", ["run1/results.json", "run0/res_0_assess.json", "link.json"])
def test_assess_correlation_out_is_never_an_input(tmp_path, capsys, target):
    from scripts import assess_correlation

    _assessed_runs(tmp_path)
    os.symlink(tmp_path / "run2" / "results.json", tmp_path / "link.json")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*.json") if not path.is_symlink()}
    out = tmp_path / target
    assert assess_correlation.main([str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: is the input "), err
    assert "outputs never replace inputs" in err[0], err
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "assess_correlation").exists()  # refused before any work


def test_assess_correlation_out_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    import json

    from scripts import assess_correlation

    _assessed_runs(tmp_path / "runs")
    written = []
    real = storage.atomic_write

    def spy(path, write):
        written.append(path)
        real(path, write)

    monkeypatch.setattr(storage, "atomic_write", spy)
    out = tmp_path / "corr.json"
    assert assess_correlation.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert written == [str(out)] and json.loads(out.read_text())["correlations"]


# ----- 4. cost_study.py --methods with an unknown name -------------------------------------------------
def test_cost_study_unknown_method_is_one_line(tmp_path, capsys):
    from scripts import cost_study

    with pytest.raises(SystemExit) as stop:
        cost_study.main(["--methods", "FOO", "--out", str(tmp_path / "cost")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --methods FOO: not a registered method; known: ") and " DM, " in err[0], err
    assert not (tmp_path / "cost").exists()


# ----- 5. make_table.py: a run name that is not UTF-8, accuracies that are not numbers ---------------------
def _results(directory, accuracy, **extra):
    import json

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, b"results.json" if isinstance(directory, bytes) else "results.json"), "w") as h:
        json.dump({"method": "DM", "dataset": "Tiny3", "ipc": 1, "accuracy": accuracy, **extra}, h)


def test_make_table_on_a_run_name_that_is_not_utf8(tmp_path, capsys):
    from scripts import make_table

    _results(os.path.join(os.fsencode(tmp_path), b"runs", b"DM_\xff\xfe_1ipc"),
             {"ConvNet": {"mean": 0.5, "std": 0.1, "accs": [0.4, 0.6]}})
    out = tmp_path / "tables"
    assert make_table.main([str(tmp_path / "runs"), "--out_dir", str(out), "--original_path", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "50.00 ± 10.00" in printed and "wrote" in printed
    assert "DM_\ufffd\ufffd_1ipc" in (out / "table.csv").read_text(encoding="utf-8")


@pytest.mark.parametrize("accuracy,needle", [
    ({"ConvNet": {"mean": "55.1"}}, "accuracy.ConvNet.mean is \"55.1\", not a number"),
    ({"ConvNet": {"mean": 0.5, "accs": "0.5"}}, "accuracy.ConvNet.accs is \"0.5\", not a list of accuracies"),
    ({"ConvNet": {"accs": [0.5, "high"]}}, "accuracy.ConvNet.accs is [0.5, \"high\"], not a list of accuracies"),
    ({"ConvNet": {"accs": [55.0]}}, "accuracy.ConvNet.accs is [55.0], not a list of accuracies (numbers in [0, 1])"),
    ({"ConvNet": "55 %"}, "accuracy.ConvNet is \"55 %\", not a record"),
    ("high", "accuracy is \"high\", not a record per evaluation model"),
])
def test_make_table_refuses_an_accuracy_that_is_not_a_number(tmp_path, capsys, accuracy, needle):
    from scripts import make_table

    _results(str(tmp_path / "runs" / "run"), accuracy)
    assert make_table.main([str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'runs' / 'run' / 'results.json'}: "), err
    assert needle in err[0] and "nan" not in err[0], err
    assert not (tmp_path / "out" / "table.md").exists()


def test_make_table_shows_a_run_without_networks_as_n_a(tmp_path, capsys):
    from scripts import make_table

    _results(str(tmp_path / "runs" / "a"), {"ConvNet": {"mean": None, "std": None, "accs": []}})
    _results(str(tmp_path / "runs" / "b"), {"ConvNet": {"mean": 0.5, "std": 0.0, "accs": [0.5]}}, ipc=2)
    assert make_table.main([str(tmp_path / "runs"), "--original_path", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "n/a (no networks)" in printed and "nan" not in printed and "50.00 ± 0.00" in printed
