"""Files a run writes for people to read: labelled picture grids and rounded CSV numbers."""
import numpy as np
import pytest
import torch
from PIL import Image

import pictures
import tables

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_grid_without_labels_is_torchvision_grid(tmp_path):
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pictures.save_image_grid(images, str(tmp_path / "plain.png"), nrow=2)
    # 8 px enlarged x7 to 56; 2 columns, 3 rows, 2 px padding
    assert Image.open(tmp_path / "plain.png").size == (2 * 58 + 2, 3 * 58 + 2)


@pytest.mark.parametrize("ipc", [1, 2])
def test_grey_grid_with_class_names_and_title_stays_grey_and_grows(tmp_path, ipc):
    images = torch.rand(10 * ipc, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    pictures.save_image_grid(images, str(plain), nrow=ipc)
    pictures.save_image_grid(images, str(labelled), nrow=ipc, class_names=FASHION,
                          title=f"DM FashionMNIST ipc {ipc}, experiment 0, iteration 5")
    pixels = _pixels(labelled)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()  # grey, text too
    width, height = Image.open(labelled).size
    # room for the title (and the row names at the left, or the captions under each image)
    assert height > 58 and width > 2 * 58
    if ipc > 1:
        assert height > Image.open(plain).size[1] and width > Image.open(plain).size[0]


def test_rgb_grid_keeps_colour(tmp_path):
    images = torch.zeros(4, 3, 8, 8)
    images[:, 0] = 1.0  # pure red
    pictures.save_image_grid(images, str(tmp_path / "red.png"), nrow=2, class_names=["a", None], title="t")
    pixels = _pixels(tmp_path / "red.png")
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)
    assert red.sum() >= 4 * 56 * 56 * 0.9


def test_grid_refuses_class_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="3 class names x nrow 2 != 4 images"):
        pictures.save_image_grid(torch.rand(4, 3, 8, 8), str(tmp_path / "x.png"), nrow=2, class_names=["a", "b", "c"])


def test_round_significant():
    assert tables.round_significant(0.1 + 0.2) == 0.3
    assert tables.round_significant(1234.5678) == 1234.57
    assert tables.round_significant(2.5e-7 + 1e-22) == 2.5e-7
    assert tables.round_significant(0.0) == 0.0 and tables.round_significant(None) is None
    assert str(tables.round_significant(float("nan"))) == "nan"


def test_summary_csv_numbers_are_rounded(tmp_path):
    from methods.runner import DistillationRun

    run = DistillationRun.__new__(DistillationRun)  # write_summary needs only opts and the rows
    run.opts = type("Opts", (), {"run_dir": str(tmp_path)})()
    run.summary_rows = [dict(exp=0, iteration=5, model="ConvNet", acc_mean=0.1 + 0.2, acc_std=0.232 / 3,
                             num_eval=2, loss=1 / 3, eval_seconds=1.25, elapsed_s=2.5),
                        dict(exp=0, iteration=0, model="ConvNet", acc_mean=0.232, acc_std=0.0, num_eval=2,
                             loss=float("nan"), eval_seconds=1.0, elapsed_s=0.0)]
    run.write_summary()
    text = (tmp_path / "summary.csv").read_text()
    assert text.splitlines()[1] == "0,5,ConvNet,0.3,0.077333,2,0.333333,1.25,2.5"
    assert text.splitlines()[2] == "0,0,ConvNet,0.232,0.0,2,nan,1.0,0.0"


def test_comparison_and_make_table_csv_numbers_are_rounded(tmp_path):
    import pandas as pd

    from sets import comparison

    assert 100 * 0.232 == 23.200000000000003  # the number that must not reach a CSV
    protocol = {"epochs": 3, "lr": 0.1 + 0.2, "augmentation": "none", "labels": "hard"}
    rows = [comparison.Row(name="DM", kind="synthetic", ipc=1, method="DM", dataset="Tiny3",
                           results={"ConvNet": {"mean": 0.232, "std": 0.0, "accs": [0.232], "protocol": protocol}}),
            comparison.Row(name="random", kind="random", ipc=1, method="random", dataset="Tiny3",
                           results={"ConvNet": {"mean": 0.1, "std": 0.0, "accs": [0.1], "protocol": protocol}})]
    _, csv_path = comparison.write_table(str(tmp_path / "t.json"), rows, ["ConvNet"], {})
    text = open(csv_path).read()
    assert "23.2," in text and "13.2," in text and ",0.3," in text  # mean, IOR (points), lr
    assert "00000" not in text and "99999" not in text
    table = pd.DataFrame({"mean": [100 * 0.232], "std": [1 / 3], "ior": [float("nan")], "n": [1]})
    assert comparison.rounded_for_csv(table).to_csv(index=False) == "mean,std,ior,n\n23.2,0.3333,,1\n"
