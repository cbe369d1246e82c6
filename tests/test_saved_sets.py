"""One reader of saved sets (``sets.saved``): every layout the toolkit writes or reads comes back as
one ``SavedSet`` record, and ``evaluate.py`` takes the network and ipc from that record."""
import json

import pytest
import torch

import data
import evaluate
import evaluation
import utils
from cli import evaluate_flags
from methods.addons import feature_labels
from sets import files
from sets.saved import SavedSet, read_saved_set, reference_name
from tiny_data import tiny_record


def _images(record, ipc, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(record.num_classes * ipc, record.channel, *record.im_size, generator=g)


def test_our_result_file_round_trips_with_its_record(tmp_path):
    record = tiny_record()
    images, logits = _images(record, 2), torch.randn(6, 3)
    features = torch.randn(1, 6, 4, 2, 2)
    protocol = evaluation.EvalProtocol(epochs_augmented=7, epochs_plain=5, lr=0.02, batch_train=4, dsa_strategy="color")
    schedule = evaluation.StepSchedule(lrs=(0.1, 0.2), batches=((0, 1), (2, 3)))
    meta = {"method": "DATM", "dataset": "Tiny3", "model": "ConvNetW32", "ipc": 2, "protocol": protocol.as_dict(),
            "eval_protocols": ["shared", "schedule"], "syn_lr": [0.03], "step_schedule": [schedule.as_dict()],
            "config": {"feature_labels": {"lbd": 0.5, "layer_idx": 1}}}
    path = tmp_path / "res_DATM_Tiny3_ConvNetW32_2ipc.pt"
    files.save_results(str(path), [[images, logits, features]], {"ConvNetW32": [0.5]}, meta=meta)
    saved = read_saved_set(str(path), record)
    assert isinstance(saved, SavedSet) and saved.layout == "result"
    assert (saved.method, saved.dataset, saved.model, saved.ipc) == ("DATM", "Tiny3", "ConvNetW32", 2)
    assert saved.protocol == protocol and saved.eval_protocols == ("shared", "schedule")
    assert saved.label_kind == "soft" and saved.has_schedule and saved.accs_all_exps == {"ConvNetW32": [0.5]}
    (experiment,) = saved.experiments
    assert torch.equal(experiment.images, images) and torch.equal(experiment.labels, logits)
    assert experiment.learned_lr == pytest.approx(0.03) and experiment.schedule == schedule
    assert torch.allclose(experiment.training_labels("cross_entropy"), torch.softmax(logits, 1))
    assert torch.equal(experiment.training_labels("mse"), logits)  # real-valued targets stay as saved
    assert torch.equal(experiment.training_labels("mse_sum"), logits)
    assert torch.equal(experiment.addons["feature_labels"], features)
    assert saved.addon_settings == {"feature_labels": {"lbd": 0.5, "layer_idx": 1}}
    # the add-on turns its raw entry into a training term in one call, with its saved settings
    term = evaluate_flags.training_term(saved, 0)
    assert term.cfg.lbd == 0.5 and term.cfg.layer_idx == 1
    assert evaluate_flags.training_term(saved, 0, {"lbd": 0.0}) is None
    assert feature_labels.load_term(features, {}, 6, 3).cfg.lbd == 0.01  # DRUPI's own files: its defaults


def test_reference_result_file_records_what_its_name_says(tmp_path):
    record = tiny_record()
    path = tmp_path / "res_DC_Tiny3_ConvNetW32_2ipc.pt"
    torch.save({"data": [[_images(record, 2), torch.arange(3).repeat_interleave(2)]],
                "accs_all_exps": {"ConvNetW32": [0.5]}}, path)
    saved = read_saved_set(str(path), record)
    assert (saved.method, saved.dataset, saved.model, saved.ipc) == ("DC", "Tiny3", "ConvNetW32", 2)
    assert saved.protocol is None and saved.eval_protocols == ("shared",) and saved.label_kind == "hard"
    assert saved.experiments[0].learned_lr is None and saved.experiments[0].addons == {}
    assert reference_name("res_DC_CIFAR10_NotANetwork_10ipc.pt") == {"method": "DC", "dataset": "CIFAR10", "ipc": 10}
    assert reference_name("b.pt") == {}


def test_logged_files_round_trip(tmp_path):
    record = tiny_record()
    images, logits = _images(record, 1), torch.randn(3, 3)
    folder = tmp_path / "logged_files" / "exp0"
    files.write_logged(str(folder), "best", images, logits, torch.tensor(0.05))
    files.write_logged(str(folder), "10", images + 1, torch.arange(3), pixels=images * 2)
    assert sorted(p.name for p in folder.iterdir()) == ["images_10.pt", "images_best.pt", "images_zca_10.pt",
                                                        "labels_10.pt", "labels_best.pt", "lr_best.pt"]
    saved = read_saved_set(str(folder), record)
    assert saved.layout == "logged" and saved.method == "exp0" and saved.model is None and saved.ipc == 1
    (experiment,) = saved.experiments
    assert torch.equal(experiment.images, images) and torch.equal(experiment.labels, logits)
    assert experiment.learned_lr == pytest.approx(0.05) and saved.label_kind == "soft"
    # a periodic file as a bare tensor, its labels named beside it
    saved = read_saved_set(str(folder / "images_10.pt"), record, labels_path=str(folder / "labels_10.pt"))
    assert saved.layout == "tensor" and saved.label_kind == "hard"
    assert torch.equal(saved.experiments[0].images, images + 1) and saved.experiments[0].learned_lr is None


def test_bare_images_without_labels_read_class_major(tmp_path):
    record = tiny_record()
    torch.save(_images(record, 3), tmp_path / "images_7.pt")
    saved = read_saved_set(str(tmp_path / "images_7.pt"), record)
    assert saved.ipc == 3 and saved.experiments[0].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_exp_picks_experiments_and_names_the_range(tmp_path):
    record = tiny_record()
    labels = torch.arange(3)
    path = str(tmp_path / "two.pt")
    files.save_results(path, [[_images(record, 1, 0), labels], [_images(record, 1, 1), labels]], {},
                       meta={"syn_lr": [0.1, 0.2]})
    saved = read_saved_set(path, record, exp=[1])
    assert saved.indices == (1,) and saved.experiments[0].learned_lr == pytest.approx(0.2)
    with pytest.raises(utils.UserError, match="--exp 2: the file holds experiments 0..1"):
        read_saved_set(path, record, exp=[2])


def _set_of(tmp_path, name, record, model):
    path = tmp_path / name
    files.save_results(str(path), [[_images(record, 1), torch.arange(record.num_classes)]], {},
                       meta={"method": "DM", "dataset": record.name, "model": model, "ipc": 1, "dsa_strategy": ""})
    return str(path)


def test_evaluate_takes_model_and_ipc_from_the_record(tmp_path, monkeypatch, capsys, one_thread):
    record = tiny_record(num_classes=2, per_class=4, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    path = _set_of(tmp_path, "set.pt", record, "ConvNetW32")
    out = tmp_path / "out.json"
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", path, "--num_eval", "1", "--epoch_eval_train", "1",
                          "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DM ipc 1 (set.pt)" in printed and "random real ipc 1" in printed
    blob = json.loads(out.read_text())
    assert set(blob) == {"ConvNetW32", "comparison"}  # --eval_mode SS: the recorded network, no --model asked
    # --model overrides the record
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", path, "--model", "MLP", "--num_eval", "1",
                          "--epoch_eval_train", "1", "--no-random_baseline", "--device", "cpu", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"MLP", "comparison"}


def test_evaluate_refuses_ipc_with_a_set_and_mixed_models(tmp_path, monkeypatch, capsys):
    record = tiny_record(num_classes=2, per_class=4, size=8)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    a = _set_of(tmp_path, "a.pt", record, "ConvNetW32")
    b = _set_of(tmp_path, "b.pt", record, "MLP")
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", a, "--ipc", "1"])
    assert error.value.code == 2 and "--ipc is for --baseline random" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", a, b, "--device", "cpu"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "different models (ConvNetW32, MLP); pass --model" in err
    assert len(err.strip().splitlines()) == 1
