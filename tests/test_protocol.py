"""One evaluation protocol: the set records the protocol distill.py evaluated it with, and
evaluate.py replays it unless flags say otherwise."""
import json

import pytest
import torch

import evaluate
import methods
import evaluation
import storage
import utils
from cli import evaluate_flags
from methods.runner import RunOptions, eval_protocol, run_distillation
from sets import files
from tiny_data import CPU, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "ConvNetW32"


def test_protocol_resolves_epochs_by_augmentation_and_the_learned_lr():
    protocol = evaluation.EvalProtocol(epochs_augmented=1000, epochs_plain=300, lr=0.02, batch_train=64)
    plain = protocol.resolve("FashionMNIST", "ConvNet", "ConvNet", 1)
    assert (plain.epochs, plain.lr, plain.batch_train, plain.dsa_strategy) == (300, 0.02, 64, "")
    assert protocol.resolve("MNIST", "ConvNet", "ConvNet", 1).epochs == 1000  # DC's MNIST augmentation
    assert protocol.resolve("FashionMNIST", "ConvNet", "ConvNetBN", 1).epochs == 1000  # crop_noise for BN
    dsa = evaluation.EvalProtocol(epochs_augmented=1800, epochs_plain=5, dsa_strategy="flip")
    assert dsa.resolve("FashionMNIST", "ConvNet", "ConvNet", 1, learned_lr=0.03).epochs == 1800
    assert dsa.resolve("FashionMNIST", "ConvNet", "ConvNet", 1, learned_lr=0.03).lr == 0.03
    assert dsa.with_epochs(7).resolve("FashionMNIST", "ConvNet", "ConvNet", 1).epochs == 7
    assert evaluation.EvalProtocol.from_dict({**dsa.as_dict(), "future_key": 1}) == dsa
    for diverged in (-0.05, 0.0, float("nan")):  # a learned lr that diverged: one clear numeric error
        with pytest.raises(FloatingPointError, match="--lr_lr"):
            dsa.resolve("FashionMNIST", "ConvNet", "ConvNet", 1, learned_lr=diverged)


@pytest.mark.parametrize("name,epochs", [("DC", (1000, 300)), ("DSA", (1000, 300)), ("DM", (1000, 1000)),
                                         ("DataDAM", (1800, 1800)), ("CAFE", (1000, 600)), ("MTT", (1000, 1000))])
def test_methods_reference_epochs(name, epochs):
    cls = methods.get_method_class(name)
    cfg = methods.DistillConfig(method=name, dataset="FashionMNIST", **{k: v for k, v in cls.defaults.items()
                                                                         if k != "eval_mode"})
    protocol = eval_protocol(cls, cfg, RunOptions())
    assert (protocol.epochs_augmented, protocol.epochs_plain) == epochs
    assert protocol.batch_train == cls.defaults["batch_train"]
    assert eval_protocol(cls, cfg, RunOptions(epoch_eval_train=9)).resolve("FashionMNIST", "ConvNet", "ConvNet", 1).epochs == 9


def test_datadam_set_is_replayed_with_1800_epochs(tmp_path, monkeypatch, capsys):
    """Distilled with --num_eval 0, then evaluate.py without epoch flags: DataDAM's 1800 epochs, batch 64."""
    record = tiny_record(per_class=8)
    cfg = methods.DistillConfig(method="DataDAM", dataset=record.name, model=MODEL, ipc=1, iterations=1, batch_real=4,
                                batch_train=64, init="real", dsa_strategy="color_crop_cutout_flip_scale_rotate")
    outcome = run_distillation(cfg, RunOptions(num_exp=1, num_eval=0, eval_models=(MODEL,),
                                               run_dir=str(tmp_path / "run"), save_vis=False), record, CPU)
    saved = files.load_results(outcome.result_path)["meta"]["protocol"]
    assert saved["epochs_augmented"] == 1800 and saved["batch_train"] == 64
    monkeypatch.setattr("data.load_dataset", lambda *a, **k: record)
    out = tmp_path / "eval.json"
    common = ["--dataset", record.name, "--model", MODEL, "--num_eval", "1", "--device", "cpu", "--no-random_baseline"]
    assert evaluate.main(["--syn_path", str(tmp_path / "run"), "--out", str(out), *common]) == 0
    protocol = json.loads(out.read_text())[MODEL]["protocol"]
    assert protocol["epochs"] == 1800 and protocol["batch_train"] == 64
    assert protocol["augmentation"] == "DSA color_crop_cutout_flip_scale_rotate"
    assert "1800 epochs" in capsys.readouterr().out
    # a flag overrides its field only
    assert evaluate.main(["--syn_path", str(tmp_path / "run"), "--out", str(out), "--epoch_eval_train", "3",
                          *common]) == 0
    protocol = json.loads(out.read_text())[MODEL]["protocol"]
    assert protocol["epochs"] == 3 and protocol["batch_train"] == 64


def test_reference_files_and_older_files_get_their_methods_protocol(tmp_path):
    record = tiny_record(per_class=4)
    images, labels = record.images_train[::4], record.labels_train[::4]
    reference = tmp_path / "res_DC_ref.pt"
    files.save_results(str(reference), [[images, labels]], {})
    args = evaluate_flags.build_parser().parse_args(["--syn_path", str(reference), "--dataset", record.name])
    assert evaluate_flags.load_set(str(reference), args, record)[2] == evaluation.EvalProtocol()
    older = tmp_path / "res_CAFE_old.pt"
    files.save_results(str(older), [[images, labels]], {}, meta={"method": "CAFE", "dataset": record.name,
                                                                   "dsa_strategy": "", "config": {"batch_train": 32}})
    protocol = evaluate_flags.load_set(str(older), args, record)[2]
    assert (protocol.epochs_augmented, protocol.epochs_plain, protocol.batch_train) == (1000, 600, 32)


def test_loading_never_runs_code(tmp_path):
    """A result file holding an object whose unpickling would run code is refused, not run."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"data": [[torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)]], "x": Evil()}, path)
    with pytest.raises(utils.UserError, match="--syn_path: .*evil.pt is not plain data"):
        files.load_results(str(path))
    torch.save({"version": storage.CHECKPOINT_VERSION, "x": Evil()}, tmp_path / "last.pt")
    with pytest.raises(utils.UserError, match="--resume: checkpoint .*last.pt is not plain data"):
        storage.load_checkpoint(str(tmp_path / "last.pt"))
    assert not marker.exists()
    # our own checkpoints, numpy's RNG state included, load as plain data
    storage.save_checkpoint(str(tmp_path / "ok.pt"), rng=utils.rng_state(), config={"a": [1, 2.5, None]})
    assert storage.load_checkpoint(str(tmp_path / "ok.pt"))["config"] == {"a": [1, 2.5, None]}
