"""Dataset facts known without loading a dataset: image shapes, class counts, default resolutions
and the ImageNet subsets' classes. The one home of these facts: the loaders (``data/``), cost
estimates (``sets/resources.py``, ``scripts/cost.py``) and expert-buffer paths
(``pretrained/buffers.py``) read them here.

Sources: the shapes are those of the torchvision datasets and of the image-folder loaders of
``data/folder_sets.py``; the ImageNet subsets and their 128-pixel default are MTT's
(GeorgeCazenavette/mtt-distillation ``utils.py`` ``config`` and ``distill.py --res``); MHIST's 224
pixels are the dataset's own image size.
"""
from __future__ import annotations

from typing import Optional

__all__ = ['DATASET_SHAPES', 'DEFAULT_RES', 'IMAGENET_SUBSETS', 'dataset_shape']

IMAGENET_SUBSETS: dict[str, tuple[int, ...]] = {
    'imagenette': (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    'imagewoof': (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    'imagefruit': (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    'imagemeow': (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    'imagesquawk': (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    'imageyellow': (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
}
"""ImageNet-1K class indices of MTT's 10-class subsets, in label order (label i = i-th index)."""

DEFAULT_RES: dict[str, int] = {'ImageNet': 128, 'MHIST': 224}
"""Image side in pixels of the datasets whose resolution is a flag (``--res``), when not given."""

DATASET_SHAPES: dict[str, tuple[int, tuple[int, int], int]] = {
    'MNIST': (1, (28, 28), 10),
    'FashionMNIST': (1, (28, 28), 10),
    'SVHN': (3, (32, 32), 10),
    'CIFAR10': (3, (32, 32), 10),
    'CIFAR100': (3, (32, 32), 100),
    'TinyImageNet': (3, (64, 64), 200),
    'ImageNet': (3, (DEFAULT_RES['ImageNet'], DEFAULT_RES['ImageNet']), 10),
    'MHIST': (3, (DEFAULT_RES['MHIST'], DEFAULT_RES['MHIST']), 2),
}
"""``(channel, (H, W), classes)`` of each dataset as ``data/`` loads it; the ImageNet subsets
(entry ``ImageNet``) and MHIST at their :data:`DEFAULT_RES`."""


def dataset_shape(dataset: str, res: Optional[int] = None) -> tuple:
    """``(channel, (H, W), num_classes)`` of a dataset without loading it.

    Args:
        dataset: a name of :data:`DATASET_SHAPES`, ``Tiny``, or an ImageNet subset name.
        res: image side in pixels for ImageNet subsets and MHIST (default :data:`DEFAULT_RES`).

    Raises:
        ValueError: unknown dataset, or ``res`` for a dataset with a fixed size (the message
            names ``--dataset`` or ``--res``).
    """
    name = "TinyImageNet" if dataset == "Tiny" else "ImageNet" if dataset.lower() in IMAGENET_SUBSETS else dataset
    if name not in DATASET_SHAPES:
        raise ValueError(f"--dataset {dataset!r}: expected one of {', '.join([*DATASET_SHAPES, *IMAGENET_SUBSETS])}")
    channel, size, classes = DATASET_SHAPES[name]
    if res is not None:
        if name not in DEFAULT_RES:
            raise ValueError(f"--res applies to ImageNet subsets and MHIST, not {dataset}")
        size = (int(res), int(res))
    return channel, size, classes
