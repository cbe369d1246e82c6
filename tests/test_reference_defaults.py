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
