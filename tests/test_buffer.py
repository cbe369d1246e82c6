"""Expert trajectories (buffer.py, scripts/score.py, pretrained/) on tiny generated data, CPU."""
import json
import logging
import os

import pytest
import torch

import buffer
import data
import networks
from scripts import score
from pretrained import buffers, experts, scores
import evaluation
import utils
from tiny_data import PROTOTYPE_SEED, tiny_record

CPU = torch.device("cpu")
MODEL = "ConvNetW32"


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    fields = dict(dataset="Tiny3", model=MODEL, train_epochs=3, batch_train=16, dsa=True)
    fields.update(overrides)
    return experts.ExpertConfig(**fields)


def make(tmp_path, num_experts, cfg=None, record=None, **kwargs):
    directory = str(tmp_path / "Tiny3_NO_ZCA" / MODEL)
    summary = experts.make_buffer(cfg or config(), record or tiny_record(), directory, num_experts, device=CPU,
                            test_every=0, **kwargs)
    return directory, summary


# ----- format, round trip, resume -------------------------------------------------------------
def test_two_experts_round_trip(tmp_path):
    record = tiny_record()
    directory, summary = make(tmp_path, 2, record=record)
    assert summary.num_experts == 2 and summary.trained == 2
    raw = torch.load(os.path.join(directory, "replay_buffer_0.pt"), weights_only=True)  # the reference's reader
    buffer = buffers.load_buffer(directory, expect=dict(dataset="tiny3", model=MODEL, zca=False))
    assert len(raw) == len(buffer) == 2
    for k, trajectory in enumerate(buffer):
        assert len(trajectory) == 4  # initialisation + 3 epochs
        net = experts.new_seeded_network(MODEL, record, CPU, seed=k)  # expert k starts from seed 0 + k
        shapes = [p.shape for p in net.parameters()]
        for snap in trajectory:
            assert [t.shape for t in snap] == shapes and all(t.device.type == "cpu" for t in snap)
        assert all(torch.equal(a, p.detach()) for a, p in zip(trajectory[0], net.parameters()))
        for before, after in zip(trajectory, trajectory[1:]):
            assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(buffer[0][0][0], buffer[1][0][0])  # experts start differently
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    assert manifest["num_experts"] == 2 and manifest["files"] == {"replay_buffer_0.pt": 2}
    assert manifest["config"]["train_epochs"] == 3 and manifest["config"]["dsa"] is True
    assert manifest["param_names"][-1] == "classifier.bias"
    assert manifest["param_shapes"] == [list(s) for s in shapes] and manifest["torch_version"] == torch.__version__
    assert buffers.load_buffer(directory, max_experts=1)[0][3][0].equal(buffer[0][3][0])


def test_interrupted_run_resumes_with_the_same_experts(tmp_path):
    def stop_after_first(index, result):
        raise KeyboardInterrupt

    directory = str(tmp_path / "Tiny3_NO_ZCA" / MODEL)
    with pytest.raises(KeyboardInterrupt):
        experts.make_buffer(config(), tiny_record(), directory, 3, device=CPU, test_every=0, save_interval=2,
                      on_expert=stop_after_first)
    first = buffers.load_buffer(directory)
    assert len(first) == 1  # the partial chunk was saved after the first expert
    _, summary = make(tmp_path, 3, save_interval=2)
    assert summary.trained == 2 and summary.num_experts == 3
    resumed = buffers.load_buffer(directory)
    assert len(resumed) == 3 and len(buffers.list_buffer_files(directory)) == 2
    assert all(torch.equal(a, b) for snap_a, snap_b in zip(first[0], resumed[0]) for a, b in zip(snap_a, snap_b))
    # an uninterrupted run gives the same experts (expert k depends only on seed + k)
    straight = buffers.load_buffer(make(tmp_path / "straight", 3, save_interval=2)[0])
    assert all(torch.equal(a, b) for ta, tb in zip(straight, resumed) for sa, sb in zip(ta, tb) for a, b in zip(sa, sb))
    assert json.load(open(os.path.join(directory, "manifest.json")))["files"] == {
        "replay_buffer_0.pt": 2, "replay_buffer_1.pt": 1}


def test_chunk_saved_but_manifest_update_lost_is_recovered(tmp_path):
    directory, _ = make(tmp_path, 1)
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest.update(num_experts=0, files={}, experts=[])  # as if killed between the two writes
    json.dump(manifest, open(manifest_path, "w"))
    _, summary = make(tmp_path, 2)
    assert summary.trained == 1 and len(buffers.load_buffer(directory)) == 2


# ----- refusing to mix, checking on load --------------------------------------------------------
def test_other_config_into_the_same_folder_is_refused(tmp_path):
    directory, _ = make(tmp_path, 1)
    with pytest.raises(utils.UserError, match="--lr_teacher 0.01 → 0.02"):
        make(tmp_path, 2, cfg=config(lr_teacher=0.02))
    with pytest.raises(utils.UserError, match="--gsam"):
        make(tmp_path, 2, cfg=config(gsam=True, rho_max=0.1, rho_min=0.1, alpha=0.3))
    assert len(buffers.load_buffer(directory)) == 1


@pytest.mark.parametrize("expect,field", [
    (dict(dataset="CIFAR10"), "dataset"),
    (dict(model="ConvNet"), "model"),
    (dict(zca=True), "zca"),
    (dict(train_epochs=50), "train_epochs"),
])
def test_manifest_mismatch_names_the_field(tmp_path, expect, field):
    directory, _ = make(tmp_path, 1, cfg=config(train_epochs=1))
    with pytest.raises(utils.UserError, match=f"made with {field}=.*buffer.py"):
        buffers.load_buffer(directory, expect=expect)


def test_missing_buffer_names_path_and_command(tmp_path):
    with pytest.raises(utils.UserError) as error:
        buffers.load_buffer((str(tmp_path), "FashionMNIST", "ConvNet", False))
    message = str(error.value)
    expected_dir = os.path.join(str(tmp_path), "FashionMNIST_NO_ZCA", "ConvNet")
    assert expected_dir in message and "python buffer.py --dataset FashionMNIST --model ConvNet" in message
    assert "\n" not in message


def test_reference_buffer_without_manifest_loads_with_a_warning(tmp_path, caplog):
    net = networks.get_network("MLP", 1, 3, (8, 8))
    trajectory = [[p.detach().clone() + e for p in net.parameters()] for e in range(3)]
    directory = tmp_path / "CIFAR10" / "MLP"
    directory.mkdir(parents=True)
    torch.save([trajectory, trajectory], directory / "replay_buffer_0.pt")
    torch.save([trajectory], directory / "replay_buffer_1.pt")
    with caplog.at_level(logging.WARNING, logger="trajectories"):
        loaded = buffers.load_buffer(str(directory), max_files=1)
    assert len(loaded) == 2 and "manifest" in caplog.text
    assert len(buffers.load_buffer(str(directory))) == 3
    with pytest.raises(utils.UserError, match="shapes"):
        buffers.load_buffer(str(directory), expect={"param_shapes": [[1, 2]]})
    with pytest.raises(utils.UserError, match="reference-format"):  # never appended to
        buffers.check_buffer_dir(str(directory), config().describe(10))


def test_buffer_dir_layout():
    assert buffers.buffer_dir("b", "fashionmnist", "ConvNet", False) == os.path.join("b", "FashionMNIST_NO_ZCA", "ConvNet")
    assert buffers.buffer_dir("b", "CIFAR10", "ConvNet", True) == os.path.join("b", "CIFAR10", "ConvNet")
    assert buffers.buffer_dir("b", "TinyImageNet", "ConvNetD4", True) == os.path.join("b", "Tiny", "ConvNetD4")
    assert buffers.buffer_dir("b", "ImageNet", "ConvNetD5", True, subset="imagewoof") == os.path.join(
        "b", "ImageNet", "imagewoof", "128", "ConvNetD5")


# ----- training pieces ----------------------------------------------------------------------------
def test_train_epoch_on_a_subset_uses_only_those_images():
    record = tiny_record()
    net = experts.new_seeded_network(MODEL, record, CPU, 3)
    seen = []

    def recording_step(n, x, y, o):
        seen.append(y.clone())
        return evaluation.sgd_step(n, x, y, o)

    index = torch.nonzero(record.labels_train == 1).flatten()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    evaluation.train_epoch(net, record.images_train, record.labels_train, optimizer, 4, utils.make_generator(1),
                      index=index, step=recording_step)
    labels = torch.cat(seen)
    assert len(labels) == len(index) and bool((labels == 1).all())


@pytest.mark.parametrize("model", ["ConvNetW32", "ConvNetBN"])
def test_gsam_with_zero_rho_and_alpha_is_plain_sgd(model):
    record = tiny_record()
    x, y = record.images_train[:20], record.labels_train[:20]
    nets = [experts.new_seeded_network(model, record, CPU, 5) for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for n in nets]
    for _ in range(2):
        loss_plain = evaluation.sgd_step(nets[0], x, y, opts[0])
        loss_gsam = experts.gsam_step(nets[1], x, y, opts[1], rho=0.0, alpha=0.0, adaptive=True)
        assert loss_plain.item() == pytest.approx(loss_gsam.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(nets[0].buffers(), nets[1].buffers()))


def test_gsam_step_matches_hand_computation():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    w0 = [p.detach().clone() for p in net.parameters()]

    def grad_at(weights):
        probe = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        return [p.grad for p in probe.parameters()]

    rho, alpha, lr = 0.5, 0.3, 0.1
    g = grad_at(w0)
    norm_g = torch.sqrt(sum((t ** 2).sum() for t in g))
    gp = grad_at([w + rho * t / norm_g for w, t in zip(w0, g)])
    norm_p = torch.sqrt(sum((t ** 2).sum() for t in gp))
    cos = sum((a * b).sum() for a, b in zip(g, gp)) / (norm_g * norm_p)
    expected = [w - lr * (b - alpha * (a - cos * norm_g * b / norm_p)) for w, a, b in zip(w0, g, gp)]
    experts.gsam_step(net, x, y, torch.optim.SGD(net.parameters(), lr=lr), rho=rho, alpha=alpha, adaptive=False)
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(net.parameters(), expected))
    assert not torch.allclose(expected[0], w0[0] - lr * g[0], atol=1e-4)  # GSAM moved differently from SGD


def test_rho_follows_the_lr():
    flat = config(gsam=True, rho_max=0.5, rho_min=0.1)
    assert experts.rho_for_lr(flat, 0.01) == 0.5
    decayed = config(gsam=True, rho_max=0.5, rho_min=0.1, decay=True)
    assert experts.rho_for_lr(decayed, 0.01) == pytest.approx(0.5) and experts.rho_for_lr(decayed, 0.001) == pytest.approx(0.1)


# ----- PAD schedule and difficulty scores -------------------------------------------------------
def test_pad_schedule_sizes_per_stage():
    schedule = experts.PadSchedule(init_ratio=0.5, add_end_epoch=4, rm_epoch_first=6, rm_epoch_second=8,
                             rm_easy_ratio_first=0.1, rm_easy_ratio_second=0.25)
    order = [torch.arange(100), torch.arange(100, 140)]  # classes of 100 and 40 images, easy first
    expected = {0: (50, 20), 2: (75, 30), 4: (100, 40), 5: (100, 40), 6: (100, 40), 7: (90, 36), 8: (90, 36),
                9: (75, 30), 20: (75, 30)}
    for epoch, (n0, n1) in expected.items():
        chosen = schedule.select(order, epoch)
        assert (chosen < 100).sum() == n0 and (chosen >= 100).sum() == n1, epoch
    assert schedule.select(order, 0)[:50].tolist() == list(range(50))  # the easiest come first
    assert 0 not in schedule.select(order, 7).tolist() and 10 in schedule.select(order, 7).tolist()
    assert [schedule.stage(e) for e in (0, 4, 5, 6, 7, 8, 9)] == [1, 1, 2, 2, 3, 3, 4]
    with pytest.raises(utils.UserError, match="--init_ratio"):
        experts.PadSchedule(init_ratio=0.0).validate()


def scored_record():
    """Tiny3 plus, per class, one 'obviously easy' image (3x its class prototype) at index c*25 and
    one mislabelled image (another class's prototype) at index c*25 + 1."""
    base = tiny_record(per_class=23)
    prototypes = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(PROTOTYPE_SEED))
    images, labels = [], []
    for c in range(3):
        members = base.images_train[base.labels_train == c]
        images += [3 * prototypes[c:c + 1], prototypes[(c + 1) % 3:(c + 1) % 3 + 1], members]
        labels += [torch.full((members.shape[0] + 2,), c)]
    base.images_train, base.labels_train = torch.cat(images), torch.cat(labels)
    return base


def test_scores_put_the_easy_image_first_and_the_mislabelled_last(tmp_path):
    record = scored_record()
    # MLP: an instance-normalised ConvNet would not see the 3x scale
    cfg = experts.ExpertConfig(dataset="Tiny3", model="MLP", train_epochs=6, batch_train=16, dsa=False, mom=0.9)
    computed = scores.score_dataset(record, cfg, num_models=2, device=CPU)
    for method in ("EL2N", "GraNd", "Uncertainty"):
        order = scores.class_order(computed[method], record.labels_train, 3)
        for c in range(3):
            assert order[c][0] == c * 25, (method, c)
            if method != "Uncertainty":  # label-free: a confidently mislabelled image looks certain
                assert order[c][-1] == c * 25 + 1, (method, c)
    path = scores.score_path(str(tmp_path), "Tiny3", "el2n")
    scores.save_scores(path, "EL2N", computed["EL2N"], record.labels_train, 3, {"dataset": "Tiny3"})
    assert scores.resolve_sort_file("EL2N", str(tmp_path), "Tiny3") == path
    rows = scores.load_sort_order(path, record.labels_train, 3)
    assert [int(r[0]) for r in rows] == [0, 25, 50]
    with pytest.raises(utils.UserError, match="another training set"):
        scores.load_sort_order(path, record.labels_train[:-1], 3)
    with pytest.raises(utils.UserError, match="score.py --dataset Tiny3 --method GraNd"):
        scores.resolve_sort_file("GraNd", str(tmp_path), "Tiny3")


# ----- the command-line scripts -----------------------------------------------------------------
@pytest.fixture
def fake_dataset(monkeypatch):
    record = scored_record()
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    return record


def test_buffer_and_score_cli_end_to_end(tmp_path, fake_dataset, capsys):
    common = ["--dataset", "Tiny3", "--buffer_path", str(tmp_path), "--device", "cpu", "--batch_train", "16"]
    assert score.main([*common, "--model", "MLP", "--method", "EL2N", "--epochs", "1", "--num_models", "1",
                       "--dsa", "False"]) == 0
    assert os.path.isfile(tmp_path / "scores" / "Tiny3_EL2N.pt")
    argv = [*common, "--model", "MLP", "--num_experts", "2", "--train_epochs", "3", "--save_interval", "1",
            "--dsa", "False", "--sort_method", "EL2N", "--init_ratio", "0.6", "--add_end_epoch", "2",
            "--rho_max", "0.05", "--alpha", "0.3", "--mom", "0.5"]
    assert buffer.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 expert(s)" in out and "test accuracy" in out
    directory = tmp_path / "Tiny3_NO_ZCA" / "MLP"
    assert sorted(os.listdir(directory)) == ["log.txt", "manifest.json", "replay_buffer_0.pt", "replay_buffer_1.pt"]
    manifest = json.load(open(directory / "manifest.json"))
    cfg = manifest["config"]
    assert cfg["dsa"] is False and cfg["dsa_strategy"] is None and cfg["gsam"] is True
    assert (cfg["rho_max"], cfg["rho_min"], cfg["alpha"], cfg["adaptive"]) == (0.05, 0.05, 0.3, True)
    assert cfg["sort_method"] == "EL2N" and cfg["init_ratio"] == 0.6 and cfg["rm_epoch_first"] == 40
    # per class 25 images: epoch 0 uses floor(0.6 * 25) = 15, epoch 1 uses 20, epoch 2 all 25
    assert manifest["experts"][0]["subset_sizes"] == [45, 60, 75]
    assert len(manifest["experts"][1]["test_acc"]) == 3
    buffer_list = buffers.load_buffer((str(tmp_path), "Tiny3", "MLP", False))
    assert len(buffer_list) == 2 and len(buffer_list[0]) == 4
    # the same command again has nothing to do; another lr is refused with one line naming the flag
    assert buffer.main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        buffer.main([*argv, "--lr_teacher", "0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "--lr_teacher" in err[0]


@pytest.mark.parametrize("argv,needle", [
    (["--init_ratio", "0.5"], "--init_ratio needs --sort_method"),
    (["--no-gsam", "--rho_max", "0.1"], "--rho_max"),
    (["--model", "ConvNetXYZ"], "ConvNetXYZ"),
    (["--num_experts", "0"], "--num_experts"),
    (["--sort_method", "GraNd"], "score.py"),
])
def test_buffer_cli_mistakes_are_one_line(tmp_path, fake_dataset, capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        buffer.main(["--dataset", "Tiny3", "--buffer_path", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_dsa_flag_accepts_reference_strings():
    parser = buffer.build_parser()
    assert parser.parse_args([]).dsa is True
    assert parser.parse_args(["--dsa", "False"]).dsa is False
    assert parser.parse_args(["--dsa", "True"]).dsa is True
    assert parser.parse_args(["--no-dsa"]).dsa is False
    assert parser.parse_args(["--dsa"]).dsa is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--dsa", "maybe"])
