"""Datasets for dataset distillation: registry, loaders, ZCA whitening and the real-image sampler.

Public API (importing the package registers every loader):

* :func:`load_dataset` -> :class:`DatasetRecord`; :func:`list_datasets`, :data:`DATASETS`,
  :func:`register_dataset`; :class:`DatasetError` for every user-facing problem.
* :func:`load_plain` (``data/plain.py``): ``torch.load(weights_only=True)`` of any file a user hands
  the toolkit, a file that would run code or inflate beyond its size refused in one line
  (:class:`PlainDataError`); :func:`set_max_bytes` (``--max_file_gb``).
* :class:`ZCA`: kornia-compatible ZCA whitening (fit / transform / inverse / state_dict).
* :class:`RealSampler` and :func:`sample_random_real`: per-class random real images.
* :func:`split_validation` -> :class:`ValidationSplit`: a class-balanced validation split held out
  of the training images (``data/validation.py``).
* Dataset facts without loading (``data/facts.py``): :data:`DATASET_SHAPES`, :func:`dataset_shape`,
  :data:`DEFAULT_RES` (the ``--res`` defaults), :data:`IMAGENET_SUBSETS`.

Datasets: MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100 (torchvision readers), TinyImageNet / Tiny
(``tinyimagenet.pt`` or ImageFolder), ImageNet subsets (imagenette, imagewoof, imagefruit,
imagemeow, imagesquawk, imageyellow; or ``'ImageNet'`` with ``subset``) and MHIST.
"""
from .core import (CIFAR10_MEAN, CIFAR10_STD, DATASETS, SHARED_STATS, TRAIN_STATS, DatasetError, DatasetLoader,
                   DatasetRecord, RawSplits, list_datasets, load_dataset, normalization_name,
                   one_line, register_dataset, train_statistics)
from .plain import PlainDataError, load_plain, set_max_bytes
from .zca import ZCA
from .sampler import RealSampler, sample_random_real
from .validation import ValidationSplit, split_validation
from . import torchvision_sets, folder_sets  # noqa: F401  (register the loaders)
from .facts import DATASET_SHAPES, DEFAULT_RES, IMAGENET_SUBSETS, dataset_shape
from .torchvision_sets import cache_dir

__all__ = [
    'CIFAR10_MEAN',
    'CIFAR10_STD',
    'DATASETS',
    'DATASET_SHAPES',
    'DEFAULT_RES',
    'DatasetError',
    'DatasetLoader',
    'DatasetRecord',
    'IMAGENET_SUBSETS',
    'PlainDataError',
    'RawSplits',
    'RealSampler',
    'SHARED_STATS',
    'TRAIN_STATS',
    'ValidationSplit',
    'ZCA',
    'cache_dir',
    'dataset_shape',
    'list_datasets',
    'load_dataset',
    'load_plain',
    'normalization_name',
    'register_dataset',
    'sample_random_real',
    'set_max_bytes',
    'split_validation',
    'train_statistics',
]
