"""Teachers (pretrained/teachers.py, cli/teacher_flags.py) and the per-epoch weights of
train_original.py, on tiny generated data (CPU); the ImageNet-scale path on a generated
ImageNet-style folder with a torchvision ResNet-18 at 224 px."""
import argparse
import os
import pickle

import pytest
import torch
import torch.nn as nn

import data
import networks
import train_original
import utils
from cli import teacher_flags
from pretrained import original_files
from pretrained import originals as O
from pretrained import teachers as T
from tiny_data import tiny_record

CPU = torch.device("cpu")
MODEL = "ConvNetW32"
pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    fields = dict(dataset="Tiny3", model=MODEL, epochs=3, batch_size=16, lr_decay_step=(2,))
    fields.update(overrides)
    return O.OriginalConfig(**fields)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two ConvNetW32 trained 3 epochs on Tiny3 with every epoch kept (``--save_epochs all``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("teachers")
    O.train_originals(config(), tiny_record(per_class=16), str(path), 2, device=CPU, save_every=0, save_epochs="all")
    torch.set_num_threads(before)
    return str(path)


def load(spec, **overrides):
    fields = dict(device=CPU, dataset="Tiny3", num_classes=3, channel=1, im_size=(8, 8))
    fields.update(overrides)
    return T.load_teacher(spec, **fields)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ----- train_original.py --save_epochs ----------------------------------------------------------
def test_parse_save_epochs():
    assert O.parse_save_epochs(None) is None and O.parse_save_epochs("none") is None and O.parse_save_epochs("") is None
    assert O.parse_save_epochs("all") == "all"
    assert O.parse_save_epochs("10, 5 5") == (5, 10)
    for bad in ("0", "x", "5,-1"):
        with pytest.raises(utils.UserError, match="--save_epochs"):
            O.parse_save_epochs(bad)
    assert O.keeps_epoch("all", 7) and O.keeps_epoch((5, 10), 10) and not O.keeps_epoch((5,), 4)
    assert not O.keeps_epoch(None, 1)


def test_kept_epochs_leave_training_unchanged_and_equal_shorter_runs(root, tmp_path):
    folder = os.path.join(original_files.original_dir(root, "Tiny3", MODEL), "index_0")
    assert original_files.list_epochs(folder) == [1, 2, 3]
    final = original_files.read_checkpoint(original_files.checkpoint_path(root, "Tiny3", MODEL, 0))
    # the same run without --save_epochs: bit-identical final weights
    O.train_originals(config(), tiny_record(per_class=16), str(tmp_path / "plain"), 1, device=CPU, save_every=0)
    plain = original_files.read_checkpoint(original_files.checkpoint_path(str(tmp_path / "plain"), "Tiny3", MODEL, 0))
    assert all(torch.equal(final["state_dict"][k], plain["state_dict"][k]) for k in plain["state_dict"])
    assert sorted(os.listdir(os.path.dirname(original_files.checkpoint_path(str(tmp_path / "plain"), "Tiny3", MODEL,
                                                                            0)))) == [
        "Tiny3_ConvNetW32_original_epoch3.pth", "checkpoint.pt"]
    # epoch_2.pt is exactly a model trained for 2 epochs (the milestones are absolute epochs)
    O.train_originals(config(epochs=2), tiny_record(per_class=16), str(tmp_path / "two"), 1, device=CPU, save_every=0)
    two = original_files.read_checkpoint(original_files.checkpoint_path(str(tmp_path / "two"), "Tiny3", MODEL, 0))
    kept = original_files.read_checkpoint(original_files.epoch_checkpoint_path(root, "Tiny3", MODEL, 0, 2))
    assert (kept["epochs_done"], kept["epochs_total"], kept["finished"]) == (2, 3, False)
    assert "optimizer" not in kept and kept["test_acc"] == pytest.approx(two["test_acc"])
    assert all(torch.equal(kept["state_dict"][k], two["state_dict"][k]) for k in two["state_dict"])
    last = original_files.read_checkpoint(original_files.epoch_checkpoint_path(root, "Tiny3", MODEL, 0, 3))
    assert last["test_acc"] == final["test_acc"] and last["finished"]


def test_train_original_script_keeps_the_asked_epochs(fake_dataset, tmp_path):
    assert train_original.main(["--dataset", "Tiny3", "--model", MODEL, "--epochs", "2", "--batch_size", "16",
                                "--save_epochs", "1", "--save_path", str(tmp_path), "--threads", "1",
                                "--device", "cpu"]) == 0
    folder = os.path.join(original_files.original_dir(str(tmp_path), "Tiny3", MODEL), "index_0")
    assert original_files.list_epochs(folder) == [1]


# ----- Teacher and load_teacher for train_original.py models ------------------------------------
def test_teacher_from_original_models_is_frozen_and_averages(root):
    nets = original_files.load_original_models(root, "Tiny3", MODEL, 2)
    teacher = load(T.TeacherSpec(models=(MODEL,), directory=root, indices=(0, 1)))
    assert len(teacher.networks) == 2 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = tiny_record().images_test[:5].clone().requires_grad_(True)
    out = teacher(x)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, (nets[0](x) + nets[1](x)) / 2)
    out.sum().backward()  # images can be optimised through a teacher (SRe2L)
    assert x.grad is not None and x.grad.abs().sum() > 0
    rows = teacher.record["networks"]
    assert teacher.record["spec"] == T.TeacherSpec(models=(MODEL,), directory=root, indices=(0, 1)).as_dict()
    assert [(r["arch"], r["index"], r["epoch"], r["num_classes"], r["channel"], r["im_size"], r["zca"]) for r in rows] \
        == [(MODEL, i, 3, 3, 1, [8, 8], False) for i in (0, 1)]
    assert rows[0]["sha256"] == T.file_sha256(original_files.checkpoint_path(root, "Tiny3", MODEL, 0))
    assert 0 < rows[0]["test_acc"] <= 1 and rows[0]["source"].endswith("checkpoint.pt")


def test_teacher_at_an_epoch_and_from_its_file(root):
    teacher = load(T.TeacherSpec(models=(MODEL,), directory=root, epoch=1))
    path = original_files.epoch_checkpoint_path(root, "Tiny3", MODEL, 0, 1)
    state = original_files.read_checkpoint(path)
    net = networks.get_network(MODEL, 1, 3, (8, 8))
    net.load_state_dict(state["state_dict"])
    net.eval()
    x = tiny_record().images_test[:4]
    torch.testing.assert_close(teacher(x), net(x), rtol=0, atol=0)
    assert teacher.record["networks"][0]["epoch"] == 1 and teacher.record["networks"][0]["source"] == path
    # the same file given by path needs no --teacher_arch
    by_path = load(T.TeacherSpec(paths=(path,)))
    assert torch.equal(by_path(x), teacher(x))
    T.check_same_teacher(teacher.record, by_path)
    with pytest.raises(utils.UserError) as err:
        T.check_same_teacher(teacher.record, load(T.TeacherSpec(models=(MODEL,), directory=root, epoch=2)))
    assert "differs from the recorded one" in one_line(err)
    with pytest.raises(utils.UserError, match="2 network"):
        T.check_same_teacher(teacher.record, load(T.TeacherSpec(models=(MODEL,), directory=root, indices=(0, 1))))


def test_missing_models_name_the_command_that_makes_them(root, tmp_path):
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(models=(MODEL,), directory=str(tmp_path / "none")))
    assert f"python train_original.py --dataset Tiny3 --model {MODEL} --num 1 --save_path" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(models=(MODEL,), directory=root, indices=(0, 2)))
    assert "--num 3" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(models=(MODEL,), directory=str(tmp_path / "none"), epoch=5))
    assert "--epochs 5 --save_epochs 5" in one_line(err) and "--teacher_epoch 5" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("resnet18",), paths=(str(tmp_path / "r18.pth"),)))
    assert "no such file" in one_line(err)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_classes=5), "has 3 classes but Tiny3 has 5"),
    (dict(im_size=(16, 16)), "takes 1x8x8 images but Tiny3 gives 1x16x16"),
    (dict(channel=3), "takes 1x8x8 images but Tiny3 gives 3x8x8"),
    (dict(zca=True), "trained without --zca but the images here are ZCA-whitened"),
])
def test_a_teacher_that_does_not_fit_the_data_is_one_line(root, overrides, message):
    for spec in (T.TeacherSpec(models=(MODEL,), directory=root),
                 T.TeacherSpec(paths=(original_files.checkpoint_path(root, "Tiny3", MODEL, 0),))):
        with pytest.raises(utils.UserError) as err:
            load(spec, **overrides)
        assert message in one_line(err)


def test_an_unfinished_model_needs_an_epoch(tmp_path):
    class Stop(Exception):
        pass

    def stop(index, epoch, loss):
        raise Stop

    with pytest.raises(Stop):
        O.train_originals(config(), tiny_record(per_class=16), str(tmp_path), 1, device=CPU, save_every=1,
                          on_epoch=stop)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(models=(MODEL,), directory=str(tmp_path)))
    assert "unfinished (1 of 3 epochs)" in one_line(err) and "--teacher_epoch 1" in one_line(err)
    assert load(T.TeacherSpec(models=(MODEL,), directory=str(tmp_path), epoch=1)).record["networks"][0]["epoch"] == 1


class RunsCode:
    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_teacher_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = RunsCode()
    evil.marker = str(marker)
    path = tmp_path / "teacher.pth"
    torch.save({"fc.weight": torch.zeros(3, 4), "hook": evil}, path)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("resnet18",), paths=(str(path),)))
    assert "refused, nothing in it was run" in one_line(err)
    assert not marker.exists()
    whole = tmp_path / "module.pth"
    torch.save(networks.get_network(MODEL, 1, 3, (8, 8)), whole)  # a pickled nn.Module, not a state_dict
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=(MODEL,), paths=(str(whole),)))
    assert "not plain data" in one_line(err)


# ----- architectures from local weight files ----------------------------------------------------
def test_networks_and_timm_architectures_from_state_dicts(tmp_path):
    import timm

    torch.manual_seed(1)
    own = networks.get_network(MODEL, 1, 3, (8, 8)).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in own.state_dict().items()}}, tmp_path / "own.pth")
    small = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1).eval()
    torch.save(small.state_dict(), tmp_path / "timm.pth")
    state = torch.get_rng_state()
    teacher = load(T.TeacherSpec(archs=(MODEL, "timm:resnet10t"), paths=(str(tmp_path / "own.pth"),
                                                                            str(tmp_path / "timm.pth"))))
    assert torch.equal(torch.get_rng_state(), state)  # building the networks does not move the caller's RNG
    x = tiny_record().images_test[:3]
    torch.testing.assert_close(teacher(x), (own(x) + small(x)) / 2)
    assert [row["arch"] for row in teacher.record["networks"]] == [MODEL, "timm:resnet10t"]
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("timm:resnet10t",), paths=(str(tmp_path / "timm.pth"),)), num_classes=4)
    assert "has 3 classes but Tiny3 has 4" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=(MODEL,), paths=(str(tmp_path / "own.pth"),)), im_size=(16, 16))
    assert "trained on other image sizes" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("timm:resnet18",), paths=(str(tmp_path / "timm.pth"),)))
    assert "does not fit --teacher_arch timm:resnet18" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("timm:resnet10t",), paths=(str(tmp_path / "timm.pth"),)), zca=True)
    assert "leave out --zca" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(paths=(str(tmp_path / "timm.pth"),)))
    assert "name its architecture with --teacher_arch" in one_line(err)
    with pytest.raises(utils.UserError) as err:
        load(T.TeacherSpec(archs=("nonet",), paths=(str(tmp_path / "timm.pth"),)))
    assert "not a torchvision model" in one_line(err)


def test_teacher_built_from_networks_and_its_record():
    torch.manual_seed(0)
    net = networks.get_network(MODEL, 1, 3, (8, 8))
    teacher = T.Teacher(networks=[net])
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(teacher(x), net.eval()(x))
    row = teacher.record["networks"][0]
    assert teacher.record["spec"] is None and row["sha256"] == T.weights_sha256(net) and row["source"] is None
    other = networks.get_network(MODEL, 1, 3, (8, 8))
    with pytest.raises(utils.UserError):
        T.check_same_teacher(teacher.record, T.Teacher([other]))
    with pytest.raises(utils.UserError, match="networks in memory"):
        T.TeacherSpec.from_dict(teacher.record)
    with pytest.raises(ValueError):
        T.Teacher([])


# ----- TeacherSpec and the flags ----------------------------------------------------------------
def parse(*argv):
    parser = argparse.ArgumentParser()
    teacher_flags.add_teacher_args(parser)
    return teacher_flags.teacher_spec(parser.parse_args(list(argv)))


def test_flags_resolve_to_a_spec_that_round_trips():
    assert parse() is None
    spec = parse("--teacher_model", "ConvNetBN,ResNet18BN", "--teacher_index", "0,1", "--teacher_epoch", "5",
                 "--teacher_arch", "timm:resnet18", "--teacher_path", "a.pth,b.pth")
    assert spec == T.TeacherSpec(models=("ConvNetBN", "ResNet18BN"), indices=(0, 1), epoch=5,
                                 archs=("timm:resnet18",), paths=("a.pth", "b.pth"))
    assert spec.directory == "pretrained_model"
    assert spec.arch_paths() == [("timm:resnet18", "a.pth"), ("timm:resnet18", "b.pth")]
    record = spec.as_dict()
    assert T.TeacherSpec.from_dict(record) == spec
    assert T.TeacherSpec.from_dict({"spec": record, "networks": []}) == spec
    assert "ConvNetBN index 0,1 epoch 5 in pretrained_model" in spec.describe()
    with pytest.raises(utils.UserError, match="unknown field"):
        T.TeacherSpec.from_dict({**record, "colour": 1})


@pytest.mark.parametrize("argv, message", [
    (["--teacher_epoch", "3"], "--teacher_epoch applies to --teacher_model"),
    (["--teacher_path", "a.pth", "--teacher_index", "1"], "--teacher_index applies to --teacher_model"),
    (["--teacher_model", "ConvNetBN", "--teacher_index", "a"], "--teacher_index 'a'"),
    (["--teacher_model", "NoNet"], "--teacher_model: unknown model 'NoNet'"),
    (["--teacher_arch", "resnet18"], "--teacher_arch resnet18 needs --teacher_path"),
    (["--teacher_arch", "resnet18,vgg11,alexnet", "--teacher_path", "a,b"], "3 architectures for 2"),
])
def test_bad_teacher_flags_are_one_line(argv, message):
    with pytest.raises(utils.UserError) as err:
        parse(*argv)
    assert message in one_line(err)


def test_teacher_epoch_below_one_is_refused_while_parsing_and_in_the_spec(capsys):
    with pytest.raises(SystemExit) as stop:
        parse("--teacher_model", "ConvNetBN", "--teacher_epoch", "0")
    assert stop.value.code == 2 and "--teacher_epoch: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(utils.UserError, match="--teacher_epoch must be at least 1"):  # a spec built elsewhere
        T.TeacherSpec(models=("ConvNetBN",), epoch=0).validate()


# ----- ImageNet scale: an ImageNet-style folder at 224 px, torchvision ResNet-18 ------------------
def make_imagenet_folder(root, per_class=2):
    """An ImageNet-1K ImageFolder miniature: 1000 class folders under train/ (only the imagenette
    classes hold images: small random RGB PNGs of varied sizes) and val/ for those classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    wnids = [f"n{index:08d}" for index in range(1000)]
    for wnid in wnids:
        os.makedirs(root / "train" / wnid)
    for label, index in enumerate(data.IMAGENET_SUBSETS["imagenette"]):
        for split, count in (("train", per_class), ("val", 1)):
            folder = root / split / wnids[index]
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                pixels = torch.randint(0, 256, (40 + 8 * k, 52, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{wnids[index]}_{k}.png")


def test_imagenet_folder_with_a_torchvision_resnet18_teacher_at_224(tmp_path):
    import torchvision

    make_imagenet_folder(tmp_path / "imagenet")
    record = data.load_dataset("imagenette", tmp_path / "imagenet", res=224)
    assert (record.channel, record.im_size, record.num_classes, len(record.labels_train)) == (3, (224, 224), 10, 20)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=1000).eval()  # ImageNet-1K weights' shapes
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    teacher = T.load_teacher(T.TeacherSpec(archs=("resnet18",), paths=(str(tmp_path / "resnet18.pth"),)),
                             device=CPU, dataset=record.name, num_classes=record.num_classes,
                             channel=record.channel, im_size=record.im_size)
    x = record.images_train[:2]
    with torch.no_grad():
        out = teacher(x)
        expected = reference(x)[:, list(data.IMAGENET_SUBSETS["imagenette"])]
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected)
    row = teacher.record["networks"][0]
    assert row["arch"] == "torchvision:resnet18" and row["num_classes"] == 1000 and row["im_size"] == [224, 224]
    assert row["class_index"] == list(data.IMAGENET_SUBSETS["imagenette"])
    # a 1000-class teacher on a dataset that is not an ImageNet subset: one line
    with pytest.raises(utils.UserError) as err:
        T.load_teacher(T.TeacherSpec(archs=("resnet18",), paths=(str(tmp_path / "resnet18.pth"),)), device=CPU,
                       dataset="MHIST", num_classes=2, channel=3, im_size=(224, 224))
    assert "has 1000 classes but MHIST has 2" in one_line(err)
    # the whole pickled network (torch.save(model)) is refused, nothing run
    torch.save(reference, tmp_path / "resnet18_module.pth")
    with pytest.raises(utils.UserError) as err:
        T.load_teacher(T.TeacherSpec(archs=("resnet18",), paths=(str(tmp_path / "resnet18_module.pth"),)),
                       device=CPU, dataset=record.name, num_classes=10, channel=3, im_size=(224, 224))
    assert "not plain data" in one_line(err) and "a reference to torchvision" in one_line(err)


def test_clom_pool_reads_kept_epochs(root):
    pool = original_files.load_pool(root, "Tiny3", [MODEL], 2, CPU, epoch=1)
    x = tiny_record().images_test[:3]
    for index, net in enumerate(pool[MODEL]):
        state = original_files.read_checkpoint(original_files.epoch_checkpoint_path(root, "Tiny3", MODEL, index, 1))
        assert all(torch.equal(net.state_dict()[k], state["state_dict"][k]) for k in state["state_dict"])
    teacher = load(T.TeacherSpec(models=(MODEL,), directory=root, indices=(0, 1), epoch=1))
    torch.testing.assert_close(teacher(x), (pool[MODEL][0](x) + pool[MODEL][1](x)) / 2)
