"""A new add-on defined in this file alone, registered through the public registry
(``methods.addons.register_addon``), used end to end through ``distill.py`` (its flag parsed, its
terms applied, its records written) and ``evaluate.py`` (its saved tensor loaded and its training
term used), without any other file naming it."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

import distill
import evaluate
from methods import addons
from methods.addons.base import AFTER_IMAGE_UPDATE, IMAGE_LOSS, TRAINING_TERM, AddOn
from sets import files

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class ShrinkConfig:
    """``--shrink W``: weight of mean(x^2) in every image update."""

    weight: float


class ShrinkTerm:
    """Networks trained on the set weight each image's cross-entropy by its saved scale."""

    steps = []  # the scales of every sgd_step, across instances (what the test checks)

    def __init__(self, scale: torch.Tensor, weight: float):
        self.scale, self.weight = scale.detach(), weight

    def check(self, net, images):
        if self.scale.shape != (images.shape[0],):
            raise ValueError(f"scale of shape {tuple(self.scale.shape)} for {images.shape[0]} images")

    def sgd_step(self, net, images, labels, index, optimizer, generator=None):
        optimizer.zero_grad(set_to_none=True)
        scale = self.scale.to(images.device)[index]
        loss = (scale * F.cross_entropy(net(images), labels, reduction="none")).mean()
        loss.backward()
        optimizer.step()
        ShrinkTerm.steps.append(scale.clone())
        return loss.detach()

    def note(self):
        return f"shrink term, weight {self.weight:g}"

    def describe(self):
        return {"shrink_weight": self.weight}


class Shrink(AddOn):
    """A toy add-on: an image term, a learned per-image scale halved after every image update,
    saved with the set and used by networks trained on it."""

    name = "shrink"
    title = "shrink"
    flag = "--shrink"
    record_key = "shrink"
    hooks = frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE, TRAINING_TERM})
    requires = (frozenset({IMAGE_LOSS, AFTER_IMAGE_UPDATE, TRAINING_TERM}),)
    saved_name = "shrink_scale"

    @classmethod
    def add_args(cls, parser):
        parser.add_argument("--shrink", type=float, default=None, help="weight of mean(x^2) (off if absent)")

    @classmethod
    def from_flags(cls, values):
        if values["shrink"] is None:
            return None
        if values["shrink"] < 0:
            raise ValueError(f"--shrink must be >= 0, got {values['shrink']}")
        return ShrinkConfig(weight=values["shrink"])

    @classmethod
    def add_eval_args(cls, parser):
        parser.add_argument("--no_shrink_term", action="store_true", help="train without the saved scales")

    @classmethod
    def saved_term(cls, entry, record, num_images, num_classes, values):
        if values.get("no_shrink_term"):
            return None
        return ShrinkTerm(entry, record["weight"])

    def __init__(self, settings, method, shared=None):
        super().__init__(settings, method, shared)
        self.values = []

    def attach(self, syn):
        syn.learn_extra("shrink_scale", torch.ones(syn.images.shape[0]))

    def image_loss(self, syn):
        term = self.settings.weight * syn.images.pow(2).mean()
        self.values.append(term.detach())
        return term

    def after_image_update(self, syn, net=None):
        with torch.no_grad():
            syn.extra("shrink_scale").mul_(0.5)

    def training_term(self, syn):
        return ShrinkTerm(syn.extra("shrink_scale"), self.settings.weight)

    def pop_logs(self):
        logs = {"shrink": torch.stack(self.values).mean()} if self.values else {}
        self.values = []
        return logs


@pytest.fixture
def shrink_addon():
    """:class:`Shrink` in the registry for one test (so no other test sees its flags)."""
    addons.register_addon(Shrink)
    ShrinkTerm.steps.clear()
    yield Shrink
    addons.unregister_addon(Shrink.name)


def distill_argv(run_dir, *more):
    return ["--method", "DM", "--dataset", "Tiny3", "--model", "ConvNetW32", "--ipc", "1", "--Iteration", "2",
            "--batch_real", "4", "--init", "real", "--dsa_strategy", "none", "--num_exp", "1", "--num_eval", "1",
            "--epoch_eval_train", "2", "--eval_mode", "S", "--device", "cpu", "--no-vis", "--run_dir", str(run_dir),
            *more]


def evaluate_argv(syn_path, out, *more):
    return ["--syn_path", str(syn_path), "--dataset", "Tiny3", "--model", "ConvNetW32", "--models", "ConvNetW32",
            "--num_eval", "1", "--epoch_eval_train", "2", "--device", "cpu", "--no-random_baseline", "--out", str(out),
            *more]


def test_a_new_addon_runs_through_distill_and_evaluate(shrink_addon, fake_dataset, tmp_path, capsys):
    assert distill.main(distill_argv(tmp_path / "plain")) == 0
    assert distill.main(distill_argv(tmp_path / "shrink", "--shrink", "0.5")) == 0
    plain, shrunk = (files.load_results(os.path.join(tmp_path / name, "res_DM_Tiny3_ConvNetW32_1ipc.pt"))
                     for name in ("plain", "shrink"))
    # its term joined the image updates (the images differ from the plain run's), and its log value was shown
    assert not torch.equal(plain["data"][0][0], shrunk["data"][0][0])
    assert "shrink=" in open(tmp_path / "shrink" / "log.txt").read()
    # its training term trained the evaluation networks: two halvings of the scale by the end
    assert ShrinkTerm.steps and torch.equal(ShrinkTerm.steps[-1], torch.full((3,), 0.25))
    # its records: the saved tensor after the labels (meta['addon_entries'] names it), its settings under its own key
    assert len(plain["data"][0]) == 2 and "addon_entries" not in plain["meta"]
    assert shrunk["meta"]["addon_entries"] == ["shrink"]
    assert torch.equal(shrunk["data"][0][2], torch.full((3,), 0.25))
    assert shrunk["meta"]["config"]["shrink"] == {"weight": 0.5} and plain["meta"]["config"]["shrink"] is None
    assert json.load(open(tmp_path / "shrink" / "results.json"))["shrink"] == {"weight": 0.5}
    assert yaml.safe_load(open(tmp_path / "shrink" / "config.yaml"))["distill"]["shrink"] == {"weight": 0.5}

    # evaluate.py loads the saved scale and trains with it
    ShrinkTerm.steps.clear()
    capsys.readouterr()
    assert evaluate.main(evaluate_argv(tmp_path / "shrink", tmp_path / "eval.json")) == 0
    assert ShrinkTerm.steps and all(torch.equal(s, torch.full((s.shape[0],), 0.25)) for s in ShrinkTerm.steps)
    assert "shrink term, weight 0.5" in capsys.readouterr().out
    assert json.load(open(tmp_path / "eval.json"))["ConvNetW32"]["protocol"]["shrink_weight"] == 0.5
    # its own evaluate.py flag turns the term off
    ShrinkTerm.steps.clear()
    assert evaluate.main(evaluate_argv(tmp_path / "shrink", tmp_path / "off.json", "--no_shrink_term")) == 0
    assert not ShrinkTerm.steps
    assert "shrink_weight" not in json.load(open(tmp_path / "off.json"))["ConvNetW32"]["protocol"]


def test_a_new_addon_is_refused_where_its_hook_points_are_missing(shrink_addon, fake_dataset, tmp_path, capsys):
    # DD's learned schedule trains with plain cross-entropy: it honours no training term, which the add-on requires
    with pytest.raises(SystemExit) as stop:
        distill.main(distill_argv(tmp_path / "dd", "--shrink", "0.5", "--method", "DD"))
    assert stop.value.code == 2
    assert "--shrink: --method DD does not support the shrink add-on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(distill_argv(tmp_path / "neg", "--shrink", "-1"))
    assert "--shrink must be >= 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "dd" / "last.pt")
