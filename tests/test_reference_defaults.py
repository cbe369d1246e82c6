"""Defaults that work (issue 24, item 8): with ``--model`` left out each method distils with its
reference's network; a ``--model`` that differs is used and named in one line."""
import pytest

import utils
from cli import distill_flags


def resolved(capsys, *argv):
    args = distill_flags.parse_args(["--dataset", "FashionMNIST", *argv])
    cfg, opts = distill_flags.resolve(args)
    captured = capsys.readouterr()
    assert "note:" not in captured.err  # a note is not an error: stdout
    return cfg, opts, captured.out


@pytest.mark.parametrize("method, dataset, expected", [
    ("DC", "FashionMNIST", "ConvNet"), ("DM", "CIFAR10", "ConvNet"), ("FRePo", "FashionMNIST", "ConvNetNN"),
    ("DD", "FashionMNIST", "LeNet"), ("DD", "CIFAR10", "ConvNet"), ("MTT", "Tiny", "ConvNetD4"),
    ("SRe2L", "FashionMNIST", "ConvNet"), ("herding", "FashionMNIST", "ConvNet"),
])
def test_model_left_out_is_the_references_network(capsys, method, dataset, expected):
    extra = ["--teacher_model", "ConvNetBN"] if method == "SRe2L" else []
    cfg, opts, err = resolved(capsys, "--method", method, "--dataset", dataset, *extra)
    assert cfg.model == expected and opts.run_dir.endswith(f"{method}_{dataset}_{expected}_{cfg.ipc}ipc")
    assert "note:" not in err


def test_a_model_other_than_the_references_is_used_and_named_in_one_line(capsys):
    cfg, _, err = resolved(capsys, "--method", "FRePo", "--model", "ConvNet")
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert cfg.model == "ConvNet" and len(notes) == 1
    assert "--model ConvNet" in notes[0] and "ConvNetNN" in notes[0] and "yongchao97/FRePo" in notes[0]
    cfg, _, err = resolved(capsys, "--method", "DC", "--model", "ConvNet")
    assert cfg.model == "ConvNet" and "note:" not in err
    cfg, _, err = resolved(capsys, "--method", "KIP", "--model", "ConvNetBN")  # no reference network: no line
    assert cfg.model == "ConvNetBN" and "note:" not in err


def test_the_note_never_joins_a_refusal(capsys):
    with pytest.raises(utils.UserError, match="--label_loss"):  # checked after the network is resolved
        resolved(capsys, "--method", "FRePo", "--model", "ConvNet", "--label_loss", "hinge")
    captured = capsys.readouterr()
    assert "note:" not in captured.out + captured.err


@pytest.mark.parametrize("method", ["SRe2L", "CDA"])
def test_sre2l_on_small_images_takes_the_cifar_codes_jitter_and_iterations(capsys, method):
    # SRe2L/*small_dataset/recover_cifar.py (--jitter 4) and recover_cifar.sh (--iteration 1000)
    # on datasets of at most 32 px; ImageNet-size data keeps recover.sh's 32 and 4000.
    teacher = ["--teacher_model", "ConvNetBN"]
    cfg, _, _ = resolved(capsys, "--method", method, *teacher)
    assert cfg.iterations == 1000 and cfg.extra["jitter"] == 4
    cfg, _, _ = resolved(capsys, "--method", method, "--dataset", "ImageNette", *teacher)
    assert cfg.iterations == 4000 and cfg.extra.get("jitter", 32) == 32
    cfg, _, _ = resolved(capsys, "--method", method, "--jitter", "8", "--Iteration", "50", *teacher)  # given wins
    assert cfg.iterations == 50 and cfg.extra["jitter"] == 8
