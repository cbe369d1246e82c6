"""Files a run writes for people to read: labelled picture grids and rounded CSV numbers."""
import numpy as np
import pytest
import torch
from PIL import Image

import utils

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_grid_without_labels_is_torchvision_grid(tmp_path):
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    utils.save_image_grid(images, str(tmp_path / "plain.png"), nrow=2)
    # 8 px enlarged x7 to 56; 2 columns, 3 rows, 2 px padding
    assert Image.open(tmp_path / "plain.png").size == (2 * 58 + 2, 3 * 58 + 2)


@pytest.mark.parametrize("ipc", [1, 2])
def test_grey_grid_with_class_names_and_title_stays_grey_and_grows(tmp_path, ipc):
    images = torch.rand(10 * ipc, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    utils.save_image_grid(images, str(plain), nrow=ipc)
    utils.save_image_grid(images, str(labelled), nrow=ipc, class_names=FASHION,
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
    utils.save_image_grid(images, str(tmp_path / "red.png"), nrow=2, class_names=["a", None], title="t")
    pixels = _pixels(tmp_path / "red.png")
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)
    assert red.sum() >= 4 * 56 * 56 * 0.9


def test_grid_refuses_class_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="3 class names x nrow 2 != 4 images"):
        utils.save_image_grid(torch.rand(4, 3, 8, 8), str(tmp_path / "x.png"), nrow=2, class_names=["a", "b", "c"])
