"""The student side of the decoupled family: soft-label losses against their formulas, the AdamW +
cosine schedule, crop/mix views, the teacher and soft label regimes, relabel stores that replay
exactly the views an online teacher labels, and defaults that leave today's protocol untouched."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation
import networks
import utils
from cli import distill_flags, eval_options, evaluate_flags
from evaluation import student as student_module
from tiny_data import CPU, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "ConvNetW32"


def logits(seed, shape=(6, 4), scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- losses -----------------------------------------------------------------------------------------

def test_each_soft_loss_equals_its_formula_by_hand():
    s, t, y, T = logits(0), logits(1), torch.tensor([0, 1, 2, 3, 0, 1]), 4.0
    B = s.shape[0]
    p = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    log_q = s / T - torch.log(torch.exp(s / T).sum(1, keepdim=True))
    kl = (p * (torch.log(p) - log_q)).sum() / B
    sce = -(p * log_q).sum() / B
    log_softmax_s = s - torch.log(torch.exp(s).sum(1, keepdim=True))
    ce = -log_softmax_s[torch.arange(B), y].mean()
    mse_gt = ((s - t) ** 2).sum() / s.numel() + 0.25 * ce
    assert torch.allclose(evaluation.soft_loss(s, t, loss="kl", temperature=T), kl, atol=1e-12)
    assert torch.allclose(evaluation.soft_loss(s, t, loss="sce", temperature=T), sce, atol=1e-12)
    assert torch.allclose(evaluation.soft_loss(s, t, loss="sce", temperature=T, t2=True), T * T * sce, atol=1e-10)
    assert torch.allclose(evaluation.soft_loss(s, t, y, loss="mse_gt", mse_gt_weight=0.25), mse_gt, atol=1e-12)
    # kl and sce differ by the teacher's entropy only; identical logits give kl 0
    assert torch.allclose(sce - kl, -(p * torch.log(p)).sum() / B, atol=1e-12)
    assert float(evaluation.soft_loss(t, t, loss="kl", temperature=T)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="mse_gt needs"):
        evaluation.soft_loss(s, t, loss="mse_gt")
    with pytest.raises(ValueError, match="--soft_loss 'l1'"):
        evaluation.soft_loss(s, t, loss="l1")


def test_a_mixed_loss_has_the_gradient_of_the_loss_against_mixed_targets():
    s, t = logits(2).requires_grad_(True), logits(3)
    perm, lam, T = torch.tensor([3, 0, 5, 1, 2, 4]), 0.3, 2.0
    mixed = evaluation.mixed(lambda target: evaluation.soft_loss(s, target, loss="kl", temperature=T), perm, lam, t)
    (grad_mixed,) = torch.autograd.grad(mixed, s)
    probs = lam * F.softmax(t / T, 1) + (1 - lam) * F.softmax(t[perm] / T, 1)
    against = F.kl_div(F.log_softmax(s / T, 1), probs, reduction="batchmean")
    (grad_against,) = torch.autograd.grad(against, s)
    assert torch.allclose(grad_mixed, grad_against, atol=1e-12)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    hard = evaluation.mixed(lambda c: F.cross_entropy(s, c), perm, lam, y)
    one_hot = lam * F.one_hot(y, 4).double() + (1 - lam) * F.one_hot(y[perm], 4).double()
    assert torch.allclose(hard, F.cross_entropy(s, one_hot), atol=1e-12)  # mixed one-hot targets


# -- optimiser ------------------------------------------------------------------------------------

def test_adamw_cosine_schedule_values_and_groups(monkeypatch):
    assert [evaluation.cosine_factor(e, 4) for e in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert evaluation.cosine_factor(5, 4) == 0.0
    record = tiny_record(per_class=4)
    cfg = evaluation.EvalConfig(epochs=4, batch_train=8, optimizer="adamw", adamw_lr=0.002, adamw_weight_decay=0.05,
                                student_aug="none")
    made = []
    original = student_module.make_adamw
    monkeypatch.setattr(student_module, "make_adamw", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    torch.manual_seed(0)
    net = networks.get_network(MODEL, 1, 3, (8, 8))
    seen = []
    evaluation.train_student(net, record.images_train, record.labels_train, cfg, utils.make_generator(0),
                             on_epoch=lambda done: seen.append([g["lr"] for g in made[0].param_groups]))
    assert evaluation.student_epochs(cfg) == 4 and len(seen) == 4
    assert [lrs[0] for lrs in seen] == pytest.approx([0.002 * evaluation.cosine_factor(e, 4) for e in range(4)])
    decay, plain = made[0].param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in plain["params"])


# -- views ----------------------------------------------------------------------------------------

def test_views_are_deterministic_and_apply_as_drawn():
    cfg = evaluation.EvalConfig(student_aug="rrc", mix_type="cutmix")
    index = torch.arange(5)
    a = evaluation.draw_views(index, (8, 8), cfg, utils.make_generator(3))
    b = evaluation.draw_views(index, (8, 8), cfg, utils.make_generator(3))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips) and torch.equal(a.permutation, b.permutation)
    assert (a.lam, a.box) == (b.lam, b.box)
    top, left, h, w = a.boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 1 + 1e-6) & (left + w <= 1 + 1e-6)).all())
    assert bool((h * w >= 0.08 * 0.5).all())  # area within the scale range up to rounding
    y1, y2, x1, x2 = a.box
    assert a.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 64)
    images = torch.randn(5, 2, 8, 8)
    full = evaluation.Views(index=index, boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5),
                            flips=torch.tensor([False, True, False, True, False]))
    out = evaluation.apply_views(images, full)
    assert torch.allclose(out[0], images[0], atol=1e-5) and torch.allclose(out[1], images[1].flip(-1), atol=1e-5)
    half = evaluation.Views(index=index[:1], boxes=torch.tensor([[0.0, 0.5, 1.0, 0.5]]), flips=torch.tensor([False]))
    ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # value = column
    cropped = evaluation.apply_views(ramp, half)[0, 0, 0]
    # the right half stretched x2: output pixel u samples column 4 + (u + 0.5) / 2 - 0.5 (the last one clamped)
    assert torch.allclose(cropped, (3.75 + torch.arange(8.0) / 2).clamp(max=7), atol=1e-5)
    mix = evaluation.Views(index=index, mix_type="cutmix", permutation=torch.tensor([1, 2, 3, 4, 0]), lam=0.75,
                           box=(0, 4, 0, 4))
    cut = evaluation.apply_views(images, mix)
    assert torch.equal(cut[0, :, :4, :4], images[1, :, :4, :4]) and torch.equal(cut[0, :, 4:], images[0, :, 4:])
    mixup = evaluation.Views(index=index, mix_type="mixup", permutation=torch.tensor([1, 2, 3, 4, 0]), lam=0.25)
    assert torch.allclose(evaluation.apply_views(images, mixup)[2], 0.25 * images[2] + 0.75 * images[3])


# -- teacher and relabel store ----------------------------------------------------------------------

class RecordingTeacher(nn.Module):
    """A fixed network whose logits are rounded to float16 (what a store keeps), recording every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs, self.outputs = net, [], []

    def forward(self, x):
        out = self.net(x).half().float()
        self.inputs.append(x.clone())
        self.outputs.append(out.clone())
        return out


def make_teacher(record):
    torch.manual_seed(7)
    return RecordingTeacher(networks.get_network(MODEL, record.channel, record.num_classes, record.im_size))


def student_cfg(**changes):
    base = dict(epochs=3, batch_train=16, labels="teacher", optimizer="adamw", student_aug="rrc", mix_type="cutmix",
                soft_loss="kl", temperature=4.0)
    return evaluation.EvalConfig(**{**base, **changes})


def test_relabel_store_replays_exactly_the_online_teachers_views_and_logits(tmp_path):
    record = tiny_record(per_class=12)  # 36 images: batches of 16, 16, 4
    images, classes = record.images_train, record.labels_train
    cfg = student_cfg()
    online_teacher = make_teacher(record)
    torch.manual_seed(1)
    online = networks.get_network(MODEL, 1, 3, (8, 8))
    evaluation.train_student(online, images, classes, cfg, utils.make_generator(5), teacher=online_teacher)

    store = evaluation.relabel(images, make_teacher(record), epochs=evaluation.student_epochs(cfg),
                               batch_size=cfg.batch_train, cfg=cfg, seed=5)
    store.save(str(tmp_path / "store"))
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["epoch_0.pt", "epoch_1.pt", "epoch_2.pt"]
    loaded = evaluation.SoftLabelStore.load(str(tmp_path / "store"))
    replayed = [(views, stored) for epoch in range(3) for views, stored in loaded.batches(epoch)]
    assert len(replayed) == len(online_teacher.inputs) == 9
    for (views, stored), seen, said in zip(replayed, online_teacher.inputs, online_teacher.outputs):
        assert torch.equal(evaluation.apply_views(images[views.index], views), seen)  # same crops, flips, mix
        assert stored.dtype == torch.float16 and torch.equal(stored.float(), said)  # same logits
    assert any(v.permutation is not None for v, _ in replayed)
    assert loaded.mb_per_epoch == pytest.approx((36 * (8 + 3 * 2 + 16 + 1 + 8) + 3 * (8 + 32)) / 1e6)

    # a student trained on the store is the student trained with the online teacher, weight for weight
    torch.manual_seed(1)
    replay = networks.get_network(MODEL, 1, 3, (8, 8))
    evaluation.train_student(replay, images, classes, student_cfg(labels="soft"), utils.make_generator(99),
                             soft_store=loaded)
    for a, b in zip(online.state_dict().values(), replay.state_dict().values()):
        assert torch.equal(a, b)


def test_store_files_are_checked_on_loading_and_replay(tmp_path):
    record = tiny_record(per_class=4)
    cfg = student_cfg(labels="soft", mix_type="mixup")
    store = evaluation.relabel(record.images_train, make_teacher(record), epochs=2, batch_size=16, cfg=cfg, seed=0)
    directory = tmp_path / "store"
    store.save(str(directory))
    with pytest.raises(ValueError, match="batches of 16; --batch_train is 8"):
        store.check_replay(12, student_cfg(labels="soft", mix_type="mixup", batch_train=8), 2)
    with pytest.raises(ValueError, match="holds 2 epochs; the student trains 4"):
        store.check_replay(12, student_cfg(labels="soft", mix_type="mixup", epochs=4), 4)
    with pytest.raises(ValueError, match="--mix_type 'mixup' \\(store\\) vs 'cutmix'"):
        store.check_replay(12, student_cfg(labels="soft"), 2)
    with pytest.raises(ValueError, match="labels 12 images, the set has 11"):
        store.check_replay(11, cfg, 2)
    with pytest.raises(ValueError, match="--student_aug rrc or none, not dc"):
        evaluation.relabel(record.images_train, make_teacher(record), epochs=1, batch_size=4, cfg=student_cfg(
            student_aug="dc"))

    content = torch.load(directory / "epoch_1.pt", weights_only=True)
    content["tensors"]["order"] = torch.zeros(12, dtype=torch.int64)
    torch.save(content, directory / "epoch_1.pt")
    with pytest.raises(utils.UserError, match="epoch_1.pt: its order is not a permutation") as caught:
        evaluation.SoftLabelStore.load(str(directory))
    assert "\n" not in str(caught.value)
    torch.save({"format": "soft_label_store", "version": 1, "tensors": {}}, directory / "epoch_1.pt")
    with pytest.raises(utils.UserError, match="missing or malformed entry"):
        evaluation.SoftLabelStore.load(str(directory))
    torch.save(nn.Linear(2, 2), directory / "epoch_1.pt")  # a pickled module would run code: refused
    with pytest.raises(utils.UserError, match="epoch_1.pt") as caught:
        evaluation.SoftLabelStore.load(str(directory))
    assert "\n" not in str(caught.value)
    (directory / "epoch_1.pt").rename(directory / "epoch_3.pt")
    with pytest.raises(utils.UserError, match="epochs \\[0, 3\\] are not 0..1"):
        evaluation.SoftLabelStore.load(str(directory))
    with pytest.raises(utils.UserError, match="no epoch_"):
        evaluation.SoftLabelStore.load(str(tmp_path / "nowhere"))


def test_teacher_and_soft_regimes_through_evaluate_synset():
    record = tiny_record(per_class=8)
    images, classes = record.images_train[::2], record.labels_train[::2]
    teacher = make_teacher(record)
    common = dict(num_eval=2, progress=False)
    cfg = student_cfg(epochs=2, batch_train=8)
    result = evaluation.evaluate_synset(images, classes, MODEL, 3, record.images_test, record.labels_test, cfg,
                                        teacher=teacher, **common)
    assert len(result.accs) == 2 and result.path == "sequential"
    assert len(teacher.inputs) == 2 * 2 * 2  # networks x epochs x batches: queried on every augmented batch
    with pytest.raises(ValueError, match="--labels teacher needs a teacher"):
        evaluation.evaluate_synset(images, classes, MODEL, 3, record.images_test, record.labels_test, cfg, **common)
    soft = student_cfg(epochs=2, batch_train=8, labels="soft", soft_loss="mse_gt")
    with pytest.raises(ValueError, match="--labels soft needs a relabel store or \\(N, K\\)"):
        evaluation.evaluate_synset(images, classes, MODEL, 3, record.images_test, record.labels_test, soft, **common)
    per_image = teacher.net(images).detach()
    result = evaluation.evaluate_synset(images, per_image, MODEL, 3, record.images_test, record.labels_test, soft,
                                        **common)
    assert len(result.accs) == 2 and all(0 <= a <= 1 for a in result.accs)
    with pytest.raises(ValueError, match="--label_loss mse applies to hard labels"):
        evaluation.evaluate_synset(images, per_image, MODEL, 3, record.images_test, record.labels_test,
                                   student_cfg(labels="soft", label_loss="mse"), **common)


# -- defaults -------------------------------------------------------------------------------------

OLD_PROTOCOL = {"epochs_augmented": 1000, "epochs_plain": 300, "lr": 0.01, "batch_train": 256, "dsa_strategy": "",
                "tta_mode": "", "deterministic": False, "stacked_eval": "auto", "label_loss": "cross_entropy"}
OLD_DESCRIBE = {"epochs": 300, "lr": 0.01, "batch_train": 256, "optimizer": "SGD", "momentum": 0.9,
                "weight_decay": 5e-4, "lr_schedule": "x0.1 after epoch 151, optimiser rebuilt",
                "augmentation": "DC none", "label_loss": "cross_entropy"}


def test_defaults_leave_protocol_records_and_accuracies_unchanged(monkeypatch):
    assert evaluation.EvalProtocol().as_dict() == OLD_PROTOCOL
    assert list(evaluation.EvalProtocol().as_dict()) == list(OLD_PROTOCOL)
    assert evaluation.EvalProtocol.from_dict(OLD_PROTOCOL) == evaluation.EvalProtocol()
    assert evaluation.EvalProtocol().resolve("FashionMNIST", "ConvNet", "ConvNet", 1).describe() == OLD_DESCRIBE
    changed = evaluation.EvalProtocol(labels="soft", optimizer="adamw", mix_type="mixup")
    assert changed.as_dict() == {**OLD_PROTOCOL, "labels": "soft", "optimizer": "adamw", "mix_type": "mixup"}
    assert evaluation.EvalProtocol.from_dict(changed.as_dict()) == changed
    assert changed.resolve("FashionMNIST", "ConvNet", "ConvNet", 1).mix_type == "mixup"

    record = tiny_record(per_class=4)
    cfg = evaluation.EvalProtocol(epochs_plain=2, batch_train=8).resolve(record.name, MODEL, MODEL, 1)
    args = (record.images_train, record.labels_train, MODEL, 3, record.images_test, record.labels_test, cfg)
    before = evaluation.evaluate_synset(*args, num_eval=2, progress=False).accs
    monkeypatch.setattr(student_module, "train_and_test_student", lambda *a, **k: pytest.fail("student path used"))
    teacher = make_teacher(record)
    after = evaluation.evaluate_synset(*args, num_eval=2, progress=False, teacher=teacher).accs
    assert after == before and teacher.inputs == []  # hard labels: the teacher is not asked


def test_a_soft_regime_records_its_loss_and_temperature_even_at_their_defaults():
    soft = evaluation.EvalProtocol(labels="soft").resolve("FashionMNIST", "ConvNet", "ConvNet", 1).describe()
    assert (soft["label_regime"], soft["label_loss"], soft["soft_loss"], soft["temperature"]) == ("soft", "kl", "kl", 20.0)
    mse = evaluation.EvalProtocol(labels="teacher", soft_loss="mse_gt").resolve(
        "FashionMNIST", "ConvNet", "ConvNet", 1).describe()
    assert mse["label_loss"] == "mse_gt" and mse["mse_gt_weight"] == 0.1 and "temperature" not in mse
    assert "soft_loss" not in evaluation.EvalProtocol().resolve("FashionMNIST", "ConvNet", "ConvNet", 1).describe()


def test_flags_reach_both_protocols():
    args = evaluate_flags.build_parser().parse_args(["--syn_path", "x.pt", "--labels", "teacher", "--mix_type", "cutmix",
                                                     "--optimizer", "adamw", "--soft_t2"])
    values = eval_options.eval_option_values(args, given_only=True)
    assert {k: values[k] for k in ("labels", "mix_type", "optimizer", "soft_t2")} == {
        "labels": "teacher", "mix_type": "cutmix", "optimizer": "adamw", "soft_t2": True}
    assert "temperature" not in values  # not given: the saved protocol's applies
    cfg, opts = distill_flags.resolve(distill_flags.parse_args(["--method", "DM", "--student_aug", "rrc",
                                                                "--min_scale_crops", "0.25"]))
    assert opts.eval_student == {"student_aug": "rrc", "min_scale_crops": 0.25}
    from methods.run_config import eval_protocol
    import methods
    protocol = eval_protocol(methods.get_method_class("DM"), cfg, opts)
    assert (protocol.student_aug, protocol.min_scale_crops, protocol.labels) == ("rrc", 0.25, "hard")
    with pytest.raises(SystemExit):  # outside (0, 1]: refused while parsing
        evaluate_flags.build_parser().parse_args(["--syn_path", "x.pt", "--min_scale_crops", "2"])
    bad = evaluate_flags.build_parser().parse_args(["--syn_path", "x.pt", "--min_scale_crops", "0.9",
                                                    "--max_scale_crops", "0.5"])
    with pytest.raises(utils.UserError, match="--min_scale_crops 0.9"):  # the pair is checked on resolve
        eval_options.eval_option_values(bad, given_only=True)
