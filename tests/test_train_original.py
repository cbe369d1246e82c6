"""Original models (train_original.py, originals.py) on tiny generated data, CPU."""
import json
import os

import pytest
import torch
import torch.nn as nn

import data
import networks
from pretrained import original_files
from pretrained import originals as O
import train_original
import evaluation
import utils
from tiny_data import tiny_record

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    fields = dict(dataset="Tiny3", model=MODEL, epochs=4, batch_size=16, lr_decay_step=(2, 3))
    fields.update(overrides)
    return O.OriginalConfig(**fields)


def train(save_path, num, cfg=None, record=None, **kwargs):
    return O.train_originals(cfg or config(), record or tiny_record(), str(save_path), num, device=CPU, **kwargs)


def state_of(save_path, index, model=MODEL):
    return original_files.read_checkpoint(original_files.checkpoint_path(str(save_path), "Tiny3", model, index))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ----- training, layout, summary ----------------------------------------------------------------
def test_two_models_write_the_layout_and_learn(tmp_path):
    done = train(tmp_path, 2)
    directory = tmp_path / "Tiny3" / "original" / MODEL
    assert done.directory == str(directory)
    assert sorted(os.listdir(directory)) == ["index_0", "index_1", "summary.json"]
    for index in (0, 1):
        assert sorted(os.listdir(directory / f"index_{index}")) == ["Tiny3_ConvNetW32_original_epoch4.pth",
                                                                     "checkpoint.pt"]
        state = state_of(tmp_path, index)
        assert (state["model"], state["dataset"], state["channel"], state["num_classes"], state["im_size"]) == (
            MODEL, "Tiny3", 1, 3, [8, 8])
        assert (state["epochs_done"], state["epochs_total"], state["finished"], state["seed"]) == (4, 4, True, index)
        assert state["config"]["weight_decay"] == 0.005 and state["config"]["lr_decay_step"] == [2, 3]
        assert state["config"]["augmentation"] == "none"
        assert state["test_acc"] > 0.8  # chance is 1/3
        # MultiStepLR: x0.1 once 2 and 3 epochs are done
        assert [h["lr"] for h in state["history"]] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
        plain = torch.load(directory / f"index_{index}" / "Tiny3_ConvNetW32_original_epoch4.pth", weights_only=True)
        assert same_weights(plain, state["state_dict"])
    assert not torch.equal(state_of(tmp_path, 0)["state_dict"]["classifier.weight"],
                           state_of(tmp_path, 1)["state_dict"]["classifier.weight"])
    summary = json.load(open(directory / "summary.json"))
    assert [row["index"] for row in summary["models"]] == [0, 1] and summary["finished"] == 2
    net = networks.get_network(MODEL, 1, 3, (8, 8))
    for row, result in zip(summary["models"], done.results):
        assert row["test_acc"] == result.test_acc and row["epochs_done"] == 4
        assert row["num_params"] == networks.count_parameters(net)
        assert row["flops_per_image"] == networks.flops_per_image(net, 1, (8, 8)) == 2 * row["macs_per_image"]
        assert row["train_seconds"] > 0 and result.status == "trained"
    assert summary["test_acc_mean"] == pytest.approx(sum(r.test_acc for r in done.results) / 2)
    table = original_files.format_table(summary)
    assert "MFLOPs/img" in table and f"{networks.count_parameters(net):,}" in table and "multiply-adds" in table


# ----- resume -----------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_interrupted_model_resumes_like_an_uninterrupted_run(tmp_path):
    cfg = config(epochs=5, momentum=0.9)

    def stop_at_epoch_3(index, epoch, loss):
        if index == 1 and epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        train(tmp_path / "a", 2, cfg, save_every=2, on_epoch=stop_at_epoch_3)
    partial = state_of(tmp_path / "a", 1)
    assert (partial["epochs_done"], partial["finished"], partial["test_acc"]) == (2, False, None)
    assert O.check_existing(str(tmp_path / "a"), cfg, 3) == {"finished": [0], "resume": [(1, 2)], "new": [2]}
    with pytest.raises(utils.UserError, match=r"unfinished: 2 of 5 epochs.*train_original.py"):
        original_files.load_original_models(str(tmp_path / "a"), "Tiny3", MODEL, 2)
    assert len(original_files.load_original_models(str(tmp_path / "a"), "Tiny3", MODEL, 2, allow_unfinished=True)) == 2

    finished_before = os.path.getmtime(original_files.checkpoint_path(str(tmp_path / "a"), "Tiny3", MODEL, 0))
    calls = []
    resumed = train(tmp_path / "a", 2, cfg, save_every=2, on_epoch=lambda i, e, l: calls.append((i, e)))
    assert calls == [(1, 3), (1, 4), (1, 5)]  # model 0 skipped, model 1 continued after epoch 2
    assert [r.status for r in resumed.results] == ["skipped (finished)", "resumed from epoch 2"]
    assert os.path.getmtime(original_files.checkpoint_path(str(tmp_path / "a"), "Tiny3", MODEL, 0)) == finished_before

    straight = train(tmp_path / "b", 2, cfg, save_every=2)
    for index in (0, 1):
        a, b = state_of(tmp_path / "a", index), state_of(tmp_path / "b", index)
        assert same_weights(a["state_dict"], b["state_dict"]), index
        assert a["test_acc"] == b["test_acc"] and len(a["history"]) == 5
    assert straight.results[1].test_acc == resumed.results[1].test_acc

    again = train(tmp_path / "a", 2, cfg, on_epoch=lambda *a: pytest.fail("a finished model was trained again"))
    assert [r.trained_epochs for r in again.results] == [0, 0]


def test_more_epochs_later_continue_a_finished_model(tmp_path):
    """The lr milestones are absolute, so epochs 1-2 of a 5-epoch run are a 2-epoch run."""
    train(tmp_path / "short", 1, config(epochs=2))
    assert state_of(tmp_path / "short", 0)["finished"]
    longer = train(tmp_path / "short", 1, config(epochs=5))
    assert longer.results[0].status == "resumed from epoch 2" and longer.results[0].epochs_done == 5
    train(tmp_path / "straight", 1, config(epochs=5))
    a, b = state_of(tmp_path / "short", 0), state_of(tmp_path / "straight", 0)
    assert same_weights(a["state_dict"], b["state_dict"]) and a["epochs_total"] == 5
    files = sorted(os.listdir(tmp_path / "short" / "Tiny3" / "original" / MODEL / "index_0"))
    assert files == ["Tiny3_ConvNetW32_original_epoch2.pth", "Tiny3_ConvNetW32_original_epoch5.pth",
                     "checkpoint.pt"]


def test_fewer_epochs_than_an_unfinished_run(tmp_path):
    def stop_at_4(index, epoch, loss):
        if epoch == 4:
            raise Stop

    with pytest.raises(Stop):
        train(tmp_path, 1, config(epochs=6), save_every=2, on_epoch=stop_at_4)
    assert state_of(tmp_path, 0)["epochs_done"] == 4
    with pytest.raises(utils.UserError, match="unfinished at 4 of 6 epochs, more than --epochs 3; use --epochs 6"):
        train(tmp_path, 1, config(epochs=3))
    closed = train(tmp_path, 1, config(epochs=4)).results[0]  # exactly 4 done: tested and marked finished
    assert closed.status == "finished at epoch 4" and closed.trained_epochs == 0
    state = state_of(tmp_path, 0)
    assert (state["finished"], state["epochs_total"], state["test_acc"]) == (True, 4, closed.test_acc)
    assert closed.test_acc is not None and len(original_files.load_original_models(str(tmp_path), "Tiny3", MODEL)) == 1
    train(tmp_path / "straight", 1, config(epochs=4))
    assert same_weights(state["state_dict"], state_of(tmp_path / "straight", 0)["state_dict"])


def test_other_flags_into_the_same_folder_are_refused(tmp_path):
    train(tmp_path, 1, config(epochs=1))
    with pytest.raises(utils.UserError, match=r"--lr 0.01 → 0.02"):
        train(tmp_path, 2, config(epochs=1, lr=0.02))
    with pytest.raises(utils.UserError, match="--seed"):
        O.check_existing(str(tmp_path), config(epochs=1, seed=7), 1)


# ----- parameters and FLOPs -----------------------------------------------------------------------
def test_parameters_and_flops_match_hand_computation():
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert networks.count_parameters(tiny) == (2 * 1 * 3 * 3 + 2) + (32 * 3 + 3)  # 119
    # conv: 2x4x4 outputs x 9 multiply-adds; linear: 32 x 3 multiply-adds; FLOPs = 2 x multiply-adds
    assert networks.flops_per_image(tiny, 1, (4, 4)) == 2 * (32 * 9 + 32 * 3)
    mlp = networks.get_network("MLP", 1, 3, (8, 8))
    assert networks.count_parameters(mlp) == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 3 + 3)
    assert networks.flops_per_image(mlp, 1, (8, 8)) == 2 * (64 * 128 + 128 * 128 + 128 * 3)
    # docs/reference-notes.md: ConvNet on MNIST-sized images has 317,706 parameters
    assert networks.count_parameters(networks.get_network("ConvNet", 1, 10, (28, 28))) == 317_706
    bn = networks.get_network("ConvNetBN", 1, 3, (8, 8)).train()
    before = [b.clone() for b in bn.buffers()]
    networks.flops_per_image(bn, 1, (8, 8))
    assert bn.training and all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))  # no stats moved


# ----- loading ------------------------------------------------------------------------------------
def test_loaded_models_are_frozen_and_give_the_saved_accuracy(tmp_path):
    record = tiny_record()
    train(tmp_path, 2, config(model="ConvNetBN"), record)
    state = torch.get_rng_state()
    models = original_files.load_original_models(str(tmp_path), "Tiny3", "ConvNetBN", device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # building them did not move the caller's RNG
    assert len(models) == 2
    for index, net in enumerate(models):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        saved = state_of(tmp_path, index, "ConvNetBN")["test_acc"]
        assert evaluation.test_accuracy(net, record.images_test, record.labels_test) == saved
    assert len(original_files.load_original_models(str(tmp_path), "Tiny3", "ConvNetBN", [1])) == 1
    with pytest.raises(utils.UserError, match="num_classes=3 but num_classes=10"):
        original_files.load_original_models(str(tmp_path), "Tiny3", "ConvNetBN", expect={"num_classes": 10})


def test_missing_models_name_the_path_and_the_command(tmp_path):
    with pytest.raises(utils.UserError) as error:
        original_files.load_original_models(str(tmp_path), "fashionmnist", "ConvNet", 3)
    message = str(error.value)
    assert os.path.join(str(tmp_path), "FashionMNIST", "original", "ConvNet", "index_0", "checkpoint.pt") in message
    assert f"python train_original.py --dataset FashionMNIST --model ConvNet --num 3 --save_path {tmp_path}" in message
    assert "\n" not in message
    with pytest.raises(utils.UserError, match="no original models in .*--num 1"):
        original_files.load_original_models(str(tmp_path), "FashionMNIST", "ConvNet")


def test_dataset_or_model_mismatch_is_refused(tmp_path):
    train(tmp_path, 1, config(model="MLP", epochs=1))
    source = tmp_path / "Tiny3" / "original" / "MLP"
    (tmp_path / "Other" / "original").mkdir(parents=True)
    os.rename(source, tmp_path / "Other" / "original" / "MLP")
    with pytest.raises(utils.UserError, match="holds a MLP trained on Tiny3, not a MLP on Other"):
        original_files.load_original_models(str(tmp_path), "Other", "MLP")
    os.rename(tmp_path / "Other" / "original" / "MLP", tmp_path / "Other" / "original" / "LeNet")
    with pytest.raises(utils.UserError, match="holds a MLP trained on Tiny3, not a LeNet"):
        original_files.load_original_models(str(tmp_path), "Other", "LeNet")
    foreign = tmp_path / "Tiny3" / "original" / "MLP" / "index_0"
    foreign.mkdir(parents=True)
    torch.save(networks.get_network("MLP", 1, 3, (8, 8)).state_dict(), foreign / "checkpoint.pt")
    with pytest.raises(utils.UserError, match="not an original-model checkpoint"):
        original_files.load_original_models(str(tmp_path), "Tiny3", "MLP")


def test_lr_decay_step_parsing():
    assert O.parse_milestones("50,100") == (50, 100)
    assert O.parse_milestones(" 50, 100 ") == (50, 100)
    assert O.parse_milestones("none") == O.parse_milestones("") == ()
    for bad in ("50,x", "0", "100,50", "50,50", "1.5"):
        with pytest.raises(utils.UserError, match="--lr_decay_step"):
            O.parse_milestones(bad)


# ----- the command-line script ----------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, fake_dataset, capsys):
    argv = ["--dataset", "Tiny3", "--model", "MLP", "--num", "2", "--epochs", "3", "--batch_size", "16",
            "--lr_decay_step", "2", "--save_path", str(tmp_path), "--device", "cpu", "--seed", "5"]
    assert train_original.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 original MLP model(s) of Tiny3" in out and "MFLOPs/img" in out and "trained" in out
    directory = tmp_path / "Tiny3" / "original" / "MLP"
    assert sorted(os.listdir(directory)) == ["index_0", "index_1", "log.txt", "summary.json"]
    summary = json.load(open(directory / "summary.json"))
    assert [row["seed"] for row in summary["models"]] == [5, 6]
    assert summary["config"]["lr_decay_step"] == [2] and summary["config"]["weight_decay"] == 0.005
    assert all(row["test_acc"] > 0.6 for row in summary["models"])
    assert summary["models"][0]["num_params"] == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 3 + 3)
    assert "epoch 3/3" in open(directory / "log.txt").read()
    # the same command again skips both; a third model is added beside them
    assert train_original.main(argv) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 2
    assert train_original.main([*argv[:5], "3", *argv[6:]]) == 0
    assert len(json.load(open(directory / "summary.json"))["models"]) == 3


def test_reference_flag_names_and_defaults():
    args = train_original.build_parser().parse_args([])
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay, args.lr_decay_step,
            args.save_every, args.num, args.model, args.save_path) == (
        150, 256, 0.01, 0.9, 0.005, "50,100", 1, 1, "ConvNet", "pretrained_model")
    assert train_original.build_parser().parse_args(["--random_seed", "3"]).seed == 3
    assert train_original.build_parser().parse_args(["--normalize_data"]).seed == 0


@pytest.mark.parametrize("argv,needle", [
    (["--num", "0"], "--num"),
    (["--lr_decay_step", "50,abc"], "--lr_decay_step"),
    (["--lr_decay_step", "100,50"], "increasing"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--model", "ConvNetXYZ"], "ConvNetXYZ"),
    (["--device", "tpu"], "--device"),
])
def test_cli_mistakes_are_one_line(tmp_path, fake_dataset, capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        train_original.main(["--dataset", "Tiny3", "--save_path", str(tmp_path), "--epochs", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_cli_refuses_other_flags_before_loading_data(tmp_path, fake_dataset, capsys, monkeypatch):
    argv = ["--dataset", "Tiny3", "--model", "MLP", "--epochs", "1", "--batch_size", "16", "--save_path",
            str(tmp_path), "--device", "cpu"]
    assert train_original.main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_original.main([*argv, "--weight_decay", "0.0005"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--weight_decay 0.005 → 0.0005" in err[0]
