"""Malformed, degenerate and oversized set files (issue: trust, round two): each is refused in one
line naming the file and what was expected, before a network is trained on it, or (legacy files)
used with a warning that says what was assumed. Every file is generated here and small: the
bounds are exercised with limits, never with real bombs."""
import logging
import zipfile

import pytest
import torch

import data
import evaluation
import utils
from data import plain
from sets import checks
from sets.saved import read_saved_set
from tiny_data import tiny_record


def _set(record, ipc=1):
    """Class-major images (N, C, H, W) in normalised space and their (N,) labels."""
    images = torch.randn(record.num_classes * ipc, record.channel, *record.im_size, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(record.num_classes).repeat_interleave(ipc)


def _save(path, images, labels, meta=None, accs=None, entries=1):
    blob = {"data": [[images, labels]] * entries, "accs_all_exps": accs if accs is not None else {}}
    if meta is not None:
        blob["meta"] = meta
    torch.save(blob, path)
    return str(path)


def _refused(path, record, needle):
    with pytest.raises(utils.UserError, match=needle) as caught:
        read_saved_set(str(path), record)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ----- sizes: checked before anything is materialised ------------------------------------------------
def test_a_compressed_torch_file_is_refused_before_its_records_are_read(tmp_path):
    source, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    torch.save({"data": [[torch.zeros(5000, 1, 32, 32), torch.zeros(5000).long()]]}, source)  # 20 MB of zeros
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < source.stat().st_size // 100  # it inflates more than 100x
    with pytest.raises(data.PlainDataError, match=r"declares 19\.\d+ MiB of data in .* compressed records"):
        data.load_plain(bomb, "set")
    assert torch.equal(data.load_plain(source)["data"][0][1], torch.zeros(5000).long())  # the stored one reads


def test_a_stride_zero_tensor_declaring_a_million_images_is_refused(tmp_path):
    path = tmp_path / "res.pt"
    torch.save({"data": [[torch.zeros(1, 1, 8, 8).expand(10 ** 6, 1, 8, 8), torch.zeros(1).long().expand(10 ** 6)]]}, path)
    assert path.stat().st_size < 20_000
    with pytest.raises(data.PlainDataError, match=r"64000000 elements laid over 64 stored ones .*aliased"):
        data.load_plain(path)


def test_a_hundred_thousand_aliased_experiments_are_refused(tmp_path):
    record = tiny_record()
    path = _save(tmp_path / "res.pt", *_set(record), entries=100_000)
    with pytest.raises(data.PlainDataError, match=r"declare 75.\d+ MiB over 792 B of stored data"):
        data.load_plain(path)


def test_more_experiments_than_a_file_may_hold_are_refused(tmp_path, monkeypatch):
    record = tiny_record()
    monkeypatch.setattr(checks, "MAX_EXPERIMENTS", 3)
    _refused(_save(tmp_path / "res.pt", *_set(record), entries=4), record, "holds 4 experiments, more than the 3")
    assert len(read_saved_set(_save(tmp_path / "ok.pt", *_set(record), entries=3), record).experiments) == 3


def test_a_file_over_the_limit_is_refused_and_the_limit_is_restored(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"x": torch.zeros(4096)}, path)
    plain.set_max_bytes(1024)
    try:
        with pytest.raises(data.PlainDataError, match="over the limit of 1.0 KiB; raise --max_file_gb"):
            data.load_plain(path)
    finally:
        plain.set_max_bytes(None)
    assert plain.max_bytes() == plain.DEFAULT_MAX_BYTES and data.load_plain(path)["x"].numel() == 4096


@pytest.mark.parametrize("make, needle", [
    (lambda: torch.zeros(4).to_sparse(), "a torch.sparse_coo tensor"),
    (lambda: torch.zeros(4, device="meta"), "a tensor on the meta device"),
    (lambda: torch.zeros(4, dtype=torch.complex64), "a complex tensor"),
])
def test_tensors_that_are_not_dense_real_cpu_tensors_are_refused(tmp_path, make, needle):
    path = tmp_path / "odd.pt"
    torch.save({"data": [[make(), torch.zeros(4)]]}, path)
    with pytest.raises(data.PlainDataError, match=needle):
        data.load_plain(path)


def test_the_limit_flag_reaches_evaluate_in_one_line(tmp_path, fake_dataset, capsys):
    import evaluate

    path = _save(tmp_path / "res_DM_Tiny3_ConvNetW32_1ipc.pt", *_set(fake_dataset))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", path, "--num_eval", "1", "--epoch_eval_train", "1",
                       "--device", "cpu", "--max_file_gb", "1e-6"])
    plain.set_max_bytes(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code != 0 and len(err) == 1 and "over the limit of" in err[0] and path in err[0], err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "lots"])
def test_the_limit_flag_takes_a_positive_number(value, capsys):
    import evaluate

    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--syn_path", "x.pt", "--max_file_gb", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: --max_file_gb") and "> 0" in err[0], err


# ----- images --------------------------------------------------------------------------------------
def test_a_set_without_images_is_refused(tmp_path):
    record = tiny_record()
    _refused(_save(tmp_path / "res.pt", torch.zeros(0, 1, 8, 8), torch.zeros(0).long()), record,
             r"data\[0\] images hold 0 images")


@pytest.mark.parametrize("dtype, needle", [(torch.uint8, "are uint8; expected floating-point images .*x / 255"),
                                           (torch.int64, "are int64; expected floating-point"),
                                           (torch.bool, "are bool; expected floating-point")])
def test_integer_or_boolean_images_are_refused_not_used_as_normalised_values(tmp_path, dtype, needle):
    record = tiny_record()
    images, labels = _set(record)
    _refused(_save(tmp_path / "res.pt", (images.abs() * 50).to(dtype), labels), record, needle)


def test_half_precision_images_are_read_as_float32(tmp_path):
    record = tiny_record()
    images, labels = _set(record)
    saved = read_saved_set(_save(tmp_path / "res.pt", images.half(), labels), record)
    assert saved.experiments[0].images.dtype == torch.float32
    assert torch.equal(saved.experiments[0].images, images.half().float())


def test_images_far_outside_the_normalised_space_are_refused(tmp_path):
    record = tiny_record()
    images, labels = _set(record)
    images[1, 0, 2, 3] = 3e5
    _refused(_save(tmp_path / "res.pt", images, labels), record, r"images reach 3e\+05")


def test_nan_images_name_the_first_image_holding_one(tmp_path):
    record = tiny_record()
    images, labels = _set(record)
    images[2, 0, 0, 0] = float("nan")
    _refused(_save(tmp_path / "res.pt", images, labels), record, r"NaN or infinite values \(1 entries, the first in image 2\)")


def test_whole_number_float_pixels_are_used_with_a_warning(tmp_path, caplog):
    record = tiny_record()
    images, labels = _set(record)
    with caplog.at_level(logging.WARNING):
        read_saved_set(_save(tmp_path / "res.pt", (images.abs() * 100).round(), labels, meta={"zca": False}), record)
    assert "look like unnormalised pixel values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_saved_set(_save(tmp_path / "ok.pt", images, labels, meta={"zca": False}), record)
    assert "pixel" not in caplog.text


# ----- labels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels, needle", [
    (torch.tensor([0.0, 1.5, 2.0]), r"fractional values \(e.g. 1.5\)"),
    (torch.tensor([True, False, True]), "are bool; expected class indices"),
    (torch.tensor([0.0, float("nan"), 2.0]), "NaN or infinite values; expected class indices"),
    (torch.tensor([0, 1, 1]), r"give no image to class\(es\) 2 of Tiny3's 3"),
    (torch.tensor([0, 1, 3]), "run 0..3; Tiny3 has classes 0..2"),
    (torch.full((3, 3), float("nan")), r"NaN or infinite values \(9 entries\)"),
    (torch.zeros(3, 4), r"shape \(3, 4\); expected \(3,\) class indices or \(3, 3\) soft labels"),
])
def test_malformed_labels_are_refused(tmp_path, labels, needle):
    record = tiny_record()
    images, _ = _set(record)
    _refused(_save(tmp_path / "res.pt", images, labels), record, needle)


def test_whole_number_float_labels_of_legacy_files_are_class_indices(tmp_path):
    record = tiny_record()
    images, labels = _set(record, ipc=2)
    saved = read_saved_set(_save(tmp_path / "res.pt", images, labels.float()), record)
    assert saved.experiments[0].labels.dtype == torch.int64 and torch.equal(saved.experiments[0].labels, labels)


# ----- the record ----------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, needle", [
    ("DM", r"'meta' is a str; expected a dict"),
    ([1, 2], r"'meta' is a list; expected a dict"),
    ({"protocol": "fast"}, r"meta\['protocol'\] is a str; expected dict"),
    ({"syn_lr": "0.01"}, r"meta\['syn_lr'\] is a str; expected list or tuple"),
    ({"syn_lr": ["fast"]}, r"meta\['syn_lr'\] holds \['fast'\]; expected one learned step size"),
    ({"ipc": 0}, r"meta\['ipc'\] is 0; expected at least 1"),
    ({"ipc": "1"}, r"meta\['ipc'\] is a str; expected int"),
    ({"mean": [float("nan")]}, r"meta\['mean'\] holds \[nan\]; expected finite numbers"),
    ({"step_schedule": ["x"]}, r"step schedule: a str, not a dict"),
    ({"protocol": {"batch_train": 0}}, r"batch_train \(--batch_train\) is 0; expected at least 1"),
    ({"protocol": {"lr": "0.01"}}, r"lr \(--lr_net\) is '0.01'; expected float"),
    ({"protocol": {"lr": -1.0}}, r"lr \(--lr_net\) is -1.0; expected a positive number"),
    ({"protocol": {"epochs_plain": 0}}, r"epochs_plain \(--epoch_eval_train\) is 0; expected at least 1"),
    ({"protocol": {"deterministic": "yes"}}, r"deterministic \(--deterministic\) is 'yes'; expected bool"),
])
def test_a_record_of_the_wrong_type_or_range_is_one_line(tmp_path, meta, needle):
    record = tiny_record()
    _refused(_save(tmp_path / "res.pt", *_set(record), meta=meta), record, needle)


@pytest.mark.parametrize("zca", [None, False, True, {"mean": torch.zeros(4), "transform": torch.eye(4)}])
def test_every_recorded_zca_form_passes_the_record_check(zca):
    record = tiny_record()
    images, labels = _set(record)
    assert checks.check_record({"data": [[images, labels]], "meta": {"zca": zca}}, "res.pt") == {"zca": zca}


def test_a_recorded_protocol_in_range_round_trips(tmp_path):
    record = tiny_record()
    protocol = evaluation.EvalProtocol(epochs_augmented=3, epochs_plain=2, lr=0.05, batch_train=8)
    saved = read_saved_set(_save(tmp_path / "res.pt", *_set(record), meta={"protocol": protocol.as_dict()}), record)
    assert saved.protocol == protocol


@pytest.mark.parametrize("accs, needle", [
    ({"ConvNet": ["0.5"]}, r"accs_all_exps\['ConvNet'\] holds \['0.5'\]; expected a list of accuracies"),
    ({"ConvNet": 0.5}, r"accs_all_exps\['ConvNet'\] holds 0.5"),
    ("high", r"'accs_all_exps' is a str"),
])
def test_saved_accuracies_that_are_not_numbers_are_refused(tmp_path, accs, needle):
    record = tiny_record()
    _refused(_save(tmp_path / "res.pt", *_set(record), accs=accs), record, needle)


def test_an_empty_lr_file_is_one_line(tmp_path):
    record = tiny_record()
    images, labels = _set(record)
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(labels, tmp_path / "labels_best.pt")
    torch.save(torch.tensor([]), tmp_path / "lr_best.pt")
    _refused(tmp_path, record, r"--lr_path: .*lr_best.pt holds a torch.float32 tensor of shape \(0,\); expected the learned step size")


def test_a_set_without_a_preprocessing_record_says_what_was_assumed(tmp_path, caplog):
    cifar = tiny_record(name="CIFAR10")
    path = _save(tmp_path / "res_DC_CIFAR10_ConvNetW32_1ipc.pt", *_set(cifar))
    with caplog.at_level(logging.WARNING):
        read_saved_set(path, cifar)
    assert "records no preprocessing: assuming its images were normalised with CIFAR10's mean/std" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a dataset the references never whiten: said at INFO only
        read_saved_set(_save(tmp_path / "tiny.pt", *_set(tiny_record())), tiny_record())
    assert "records no preprocessing" not in caplog.text
    with caplog.at_level(logging.INFO):
        read_saved_set(_save(tmp_path / "tiny.pt", *_set(tiny_record())), tiny_record())
    assert "normalised with Tiny3's mean/std" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        read_saved_set(_save(tmp_path / "ours.pt", *_set(cifar), meta={"zca": False}), cifar)
    assert "records no preprocessing" not in caplog.text


def test_a_malformed_set_through_evaluate_is_one_line_and_no_traceback(tmp_path, fake_dataset, capsys):
    import evaluate

    images, labels = _set(fake_dataset)
    path = _save(tmp_path / "res_DM_Tiny3_ConvNetW32_1ipc.pt", (images.abs() * 50).to(torch.uint8), labels)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", path, "--num_eval", "1", "--epoch_eval_train", "1",
                       "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "records no preprocessing" not in line]
    assert stop.value.code != 0 and len(err) == 1 and "are uint8; expected floating-point images" in err[0], err
    assert "Traceback" not in " ".join(err)


@pytest.mark.parametrize("extra", [[], ["--assess"]])
def test_a_whitened_set_evaluated_without_zca_is_one_line(tmp_path, fake_dataset, capsys, extra):
    import evaluate

    path = _save(tmp_path / "res_DM_Tiny3_ConvNetW32_1ipc.pt", *_set(fake_dataset), meta={"zca": True})
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--dataset", "Tiny3", "--syn_path", path, "--no-zca", "--num_eval", "1",
                       "--epoch_eval_train", "1", "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code != 0 and len(err) == 1, err
    assert "distilled on ZCA-whitened images, the test set here is not whitened: pass --zca" in err[0]


def test_a_whitened_set_in_the_continual_script_is_one_line(tmp_path, fake_dataset, capsys):
    from scripts import continual

    path = _save(tmp_path / "res_DM_Tiny3_ConvNetW32_1ipc.pt", *_set(fake_dataset), meta={"zca": True})
    with pytest.raises(SystemExit) as stop:
        continual.main(["--dataset", "Tiny3", "--syn_path", path, "--device", "cpu", "--steps", "3",
                        "--out", str(tmp_path / "continual.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code != 0 and len(err) == 1 and "pass --zca" in err[-1], err
