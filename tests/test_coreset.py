"""Coreset baselines (random, herding, k-center, forgetting) and the selection-only run path."""
import json
import os

import pytest
import torch

from cli import distill_flags

import methods
import chunked
import utils
from sets import files
from data import RealSampler
from methods.coreset import (count_forgetting_events, forgetting_statistics, herding_select, kcenter_select,
                             most_forgotten)
from methods.runner import RunOptions, run_distillation
from tiny_data import tiny_record

CPU = torch.device("cpu")


# ----- pure selection rules -------------------------------------------------------------------
def test_herding_first_pick_is_nearest_the_mean_then_tracks_it():
    # mean of the four rows is (1, 0): row 2 sits on it; after it, the pair whose mean is closest
    # to (1, 0) with row 2 is row 0 + row 2 -> (0.5+1)/2 ... computed by hand below.
    features = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 0.0], [1.0, -1.0]])
    picks = herding_select(features, 4).tolist()
    assert picks[0] == 2
    # k = 2: candidates (f2 + f_i)/2: i=0 -> (0.5, 0) d=.5; i=1 -> (1.5, .5) d=.707; i=3 -> (1, -.5) d=.5
    # tie between 0 and 3 goes to the lowest index.
    assert picks[1] == 0
    # k = 3: running sum (1, 0); i=1 -> (3, 1)/3 d=sqrt(0+1/9)=.333; i=3 -> (2, -1)/3 d=sqrt(1/9+1/9)=.471
    assert picks[2] == 1
    assert sorted(picks) == [0, 1, 2, 3]


def test_herding_never_repeats_and_checks_input():
    features = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    picks = herding_select(features, 10)
    assert len(set(picks.tolist())) == 10
    with pytest.raises(ValueError, match="cannot pick 11"):
        herding_select(features, 11)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        herding_select(torch.zeros(3), 1)


def test_kcenter_picks_farthest_point_from_current_centres():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 3.0], [-0.2, 0.0]])
    picks = kcenter_select(features, 3, first=0).tolist()
    assert picks[0] == 0
    assert picks[1] == 2  # distance 5 from the only centre
    # remaining nearest distances to {0, 2}: 0.1, 3, 0.2 -> row 3
    assert picks[2] == 3
    # default start: the row nearest the mean (mean = (0.98, 0.6); row 1 at (0.1, 0) is nearest)
    assert kcenter_select(features, 1).tolist() == [1]


def test_forgetting_counts_hand_built_sequences():
    # rows: presentations; columns: examples
    correct = torch.tensor([
        [1, 0, 1, 0, 1],
        [0, 0, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    counts = count_forgetting_events(correct)
    # ex0: 1->0 twice; ex1: never learned -> inf; ex2: one 1->0; ex3: 0,1,0,1 -> one; ex4: none
    assert counts[0] == 2 and counts[2] == 1 and counts[3] == 1 and counts[4] == 0
    assert counts[1] == float("inf")
    picks = most_forgotten(counts, 2, torch.Generator().manual_seed(0)).tolist()
    assert picks == [1, 0]
    # ties (2 and 3 both 1) are both reachable depending on the seed, never example 4
    thirds = {most_forgotten(counts, 3, torch.Generator().manual_seed(s)).tolist()[2] for s in range(20)}
    assert thirds == {2, 3}


def test_forgetting_statistics_records_every_example_each_epoch(one_thread):
    record = tiny_record(num_classes=2, per_class=6, size=8)
    torch.manual_seed(0)
    import networks
    net = networks.get_network("ConvNet", 1, 2, (8, 8))
    correct = forgetting_statistics(net, record.images_train, record.labels_train, epochs=3, lr=0.01,
                                    batch_size=4, generator=torch.Generator().manual_seed(0))
    assert correct.shape == (3, 12) and correct.dtype == torch.bool
    with pytest.raises(ValueError, match="forgetting_epochs"):
        forgetting_statistics(net, record.images_train, record.labels_train, 0, 0.01, 4, torch.Generator())


# ----- methods and the run loop ---------------------------------------------------------------
def build(name, record, ipc=2, seed=0, **extra):
    cfg = methods.DistillConfig(method=name, dataset="Tiny3", model="ConvNet", ipc=ipc, iterations=0, init="real",
                                lr_net=0.01, batch_train=8, extra=extra)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    torch.manual_seed(seed)
    return methods.create_method(cfg, channel=record.channel, num_classes=record.num_classes,
                                 im_size=record.im_size, sampler=sampler, device=CPU,
                                 generator=utils.make_generator(seed))


@pytest.mark.parametrize("name,extra", [("random", {}), ("herding", {}), ("kcenter", {}),
                                        ("forgetting", {"forgetting_epochs": 2})])
def test_selection_methods_return_real_images_of_each_class(name, extra, one_thread):
    record = tiny_record(num_classes=3, per_class=8, size=8)
    method = build(name, record, ipc=2, **extra)
    assert method.selection_only
    syn = method.init_synthetic()
    assert syn.images.shape == (6, 1, 8, 8)
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # each chosen image is a training image of its labelled class, and none repeats within a class
    for row, index in enumerate(method.selected_indices.tolist()):
        assert torch.equal(syn.images[row], record.images_train[index])
        assert int(record.labels_train[index]) == int(syn.labels[row])
    assert len(set(method.selected_indices.tolist())) == 6


def test_herding_method_uses_the_embedding_of_the_seeded_network(one_thread):
    record = tiny_record(num_classes=2, per_class=8, size=8)
    method = build("herding", record, ipc=3, seed=5)
    syn = method.init_synthetic()
    torch.manual_seed(5)
    import networks
    net = networks.get_network("ConvNet", 1, 2, (8, 8)).eval()
    class0 = record.images_train[record.labels_train == 0]
    expected = herding_select(chunked.embed_in_chunks(net, class0), 3)
    assert torch.equal(syn.images[:3], class0[expected])


def test_coreset_model_path_without_models_is_a_user_error(tmp_path, one_thread):
    record = tiny_record(num_classes=2, per_class=4, size=8)
    method = build("kcenter", record, coreset_model_path=str(tmp_path))
    with pytest.raises(utils.UserError, match="train_original.py"):
        method.init_synthetic()


def test_runner_saves_a_selection_run_without_iterations(tmp_path, one_thread):
    record = tiny_record(num_classes=2, per_class=6, size=8)
    cfg = methods.DistillConfig(method="herding", dataset="Tiny3", model="ConvNet", ipc=1, iterations=50,
                                init="real", batch_train=8)
    opts = RunOptions(num_exp=2, num_eval=1, eval_it=5, epoch_eval_train=1, run_dir=str(tmp_path), save_vis=False)
    outcome = run_distillation(cfg, opts, record, CPU)
    blob = files.load_results(outcome.result_path)
    assert len(blob["data"]) == 2 and blob["data"][0][0].shape == (2, 1, 8, 8)
    assert len(outcome.accs_all_exps["ConvNet"]) == 2
    results = json.load(open(os.path.join(tmp_path, "results.json")))
    assert results["iterations"] == 0  # --Iteration is ignored by a selection method
    cost = results["cost"]
    assert cost["storage_bytes"] == {"images": 2 * 64 * 4, "labels": 2 * 8, "total": 2 * 64 * 4 + 16}
    assert cost["network"]["params"] > 0 and cost["network"]["flops_per_image"] > 0
    assert cost["peak_memory"]["bytes"] > 0 and cost["distill_seconds"] >= 0
    assert results["protocol"]["ConvNet"]["labels"] == "hard"
    # one evaluation per experiment (no extra iteration-0 evaluation), at iteration 0
    rows = open(os.path.join(tmp_path, "summary.csv")).read().strip().splitlines()[1:]
    assert len(rows) == 2 and all(row.split(",")[1] == "0" for row in rows)


def test_distill_cli_accepts_selection_methods(tmp_path, monkeypatch, one_thread):
    import distill

    args = distill_flags.parse_args(["--method", "kcenter", "--dataset", "FashionMNIST", "--ipc", "1",
                               "--coreset_model_path", "x", "--run_dir", str(tmp_path)])
    cfg, opts = distill_flags.resolve(args)
    assert cfg.iterations == 0 and cfg.init == "real" and cfg.extra == {"coreset_model_path": "x"}
    with pytest.raises(SystemExit) as stop:  # refused while parsing (the option's declared range)
        distill_flags.parse_args(["--method", "forgetting", "--dataset", "FashionMNIST", "--forgetting_epochs", "0"])
    assert stop.value.code == 2
    with pytest.raises(ValueError, match="--forgetting_epochs must be >= 1"):  # and by the options themselves
        methods.get_method_class("forgetting").resolve_options({"forgetting_epochs": 0})
