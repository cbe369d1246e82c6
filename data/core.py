"""Dataset registry, the loaded-dataset record and the one entry point ``load_dataset``.

Every dataset loader returns a :class:`RawSplits` (pixels in [0, 1] or uint8, no normalisation).
``load_dataset`` then applies the shared preprocessing of the DC-utils family
(VICO-UoE/DatasetCondensation ``utils.get_dataset``, copied by MTT, DataDAM, CAFE, DATM, PAD):

* default: ``ToTensor`` then channel-wise ``Normalize(mean, std)``, no augmentation;
* ``zca=True`` (MTT, DATM, PAD, DataDAM): ``ToTensor`` only, then ZCA whitening fitted on the
  training set and applied to train and test (see :mod:`data.zca`).

Loaders register themselves with :func:`register_dataset` when the ``data`` package is imported.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .zca import ZCA

_logger = logging.getLogger(__name__)

__all__ = [
    'DatasetError',
    'DatasetRecord',
    'RawSplits',
    'DatasetLoader',
    'DATASETS',
    'register_dataset',
    'list_datasets',
    'load_dataset',
    'CIFAR10_MEAN',
    'CIFAR10_STD',
    'SHARED_STATS',
    'TRAIN_STATS',
    'normalization_name',
    'train_statistics',
]


class DatasetError(Exception):
    """A user-facing dataset problem, with a one-line message.

    Raised for an unknown dataset name, missing or malformed files, an unsupported ``res`` or
    ``subset``, or too few real images for a request. The message names the path(s) searched and
    the files or layout expected, so a command-line script can print it without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse ``text`` (any object, via ``str``) to a single line with single spaces."""
    return ' '.join(str(text).split())


@dataclass
class RawSplits:
    """What a registered loader returns: un-normalised train/test images and dataset constants.

    Attributes:
        channel: number of image channels C.
        im_size: (H, W) in pixels.
        class_names: one name per class; its length is the number of classes K.
        mean: per-channel mean (length C) used by ``Normalize``, in [0, 1] pixel units.
        std: per-channel std (length C), in [0, 1] pixel units.
        images_train: (N, C, H, W), either uint8 in [0, 255] or floating point in [0, 1].
        labels_train: (N,) integer labels in [0, K).
        images_test: (M, C, H, W), same convention as ``images_train``.
        labels_test: (M,) integer labels in [0, K).
        name: the record's name when it should differ from the registered name (dataset
            'ImageNet' names its record after the subset); None keeps the registered name.
        source: the folder (or file) the images were read from; None: ``data_path``.
    """

    channel: int
    im_size: tuple[int, int]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    images_train: Tensor = field(repr=False)
    labels_train: Tensor = field(repr=False)
    images_test: Tensor = field(repr=False)
    labels_test: Tensor = field(repr=False)
    name: str | None = None
    source: str | None = None


class DatasetLoader(Protocol):
    """Signature of a registered loader.

    A loader reads files under ``data_path`` and returns :class:`RawSplits`. It raises
    :class:`DatasetError` for missing or malformed files and for a ``res``/``subset`` it does not
    support (helpers: :func:`reject_res`, :func:`reject_subset`).
    """

    def __call__(self, data_path: str, *, download: bool = False, res: int | None = None,
                 subset: str | None = None) -> RawSplits: ...


@dataclass
class DatasetRecord:
    """A loaded dataset, preprocessed and ready for distillation and evaluation.

    Images live in the space the references optimise synthetic images in: normalised
    ((x - mean) / std per channel) by default, or ZCA-whitened when ``zca`` is set.

    Attributes:
        name: the canonical registered name (e.g. ``'CIFAR10'``, ``'imagenette'``).
        channel: number of channels C.
        im_size: (H, W) in pixels.
        num_classes: number of classes K.
        class_names: K class names (torchvision's ``.classes`` where it has them).
        mean: per-channel mean in [0, 1] pixel units (not applied when ``zca`` is set).
        std: per-channel std in [0, 1] pixel units (not applied when ``zca`` is set).
        images_train: (N, C, H, W) float32, normalised or whitened, on the CPU.
        labels_train: (N,) int64 in [0, K).
        images_test: (M, C, H, W) float32, same preprocessing as the training images.
        labels_test: (M,) int64 in [0, K).
        zca: the whitening fitted on the training set, or None without ``zca``.
        source: where the images were read from (a folder or file path; ``''`` when unknown).
        normalization: what was applied: ``'zca'``, ``'own'`` (the dataset's fixed mean/std, DC's),
            ``'train_stats'`` (mean/std computed from the training images) or the name of the
            dataset whose mean/std were used (``'CIFAR10'``; see :func:`load_dataset`).
    """

    name: str
    channel: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    images_train: Tensor = field(repr=False)
    labels_train: Tensor = field(repr=False)
    images_test: Tensor = field(repr=False)
    labels_test: Tensor = field(repr=False)
    zca: ZCA | None = field(default=None, repr=False)
    source: str = ''
    normalization: str = 'own'

    def denormalize(self, images: Tensor) -> Tensor:
        """Map images from the record's space back to pixel space.

        Args:
            images: (..., C, H, W) normalised or whitened images, any device and float dtype.

        Returns:
            Tensor of the same shape in [0, 1] (clamped): ``zca.inverse(images)`` when a ZCA is
            set, else ``images * std + mean`` per channel.
        """
        if self.zca is not None:
            pixels = self.zca.inverse(images)
        else:
            mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
            pixels = images * std + mean
        return pixels.clamp(0.0, 1.0)


DATASETS: dict[str, DatasetLoader] = {}
"""Registered loaders, by dataset name (aliases such as ``'Tiny'`` map to the same loader)."""


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator that registers a loader under ``name`` (timm/torchdistill-style registry).

    Args:
        name: the dataset name accepted by :func:`load_dataset`; apply the decorator twice to add
            an alias.

    Returns:
        A decorator that stores the loader in :data:`DATASETS` and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered, or differs only in case from a registered name.
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        clash = [key for key in DATASETS if key.lower() == name.lower()]
        if clash:
            raise ValueError(f'dataset {name!r} is already registered (as {clash[0]!r})')
        DATASETS[name] = loader
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Return the registered dataset names, sorted case-insensitively."""
    return sorted(DATASETS, key=str.lower)


def reject_res(name: str, res: int | None) -> None:
    """Raise :class:`DatasetError` if ``res`` is given for a dataset with a fixed resolution."""
    if res is not None:
        raise DatasetError(f'--res applies only to the ImageNet subsets and MHIST; {name} has a fixed '
                           f'resolution (got res={res})')


def reject_subset(name: str, subset: str | None) -> None:
    """Raise :class:`DatasetError` if ``subset`` is given for a dataset without subsets."""
    if subset is not None:
        raise DatasetError(f"--subset applies only to dataset 'ImageNet'; {name} has no subsets "
                           f'(got subset={subset!r})')


def _resolve_name(name: str) -> str:
    if name in DATASETS:
        return name
    matches = [key for key in DATASETS if key.lower() == str(name).lower()]
    if len(matches) == 1:
        return matches[0]
    raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floating input is copied to float32 as is."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32, copy=True)
    raise DatasetError(f'images must be uint8 or floating point, got {images.dtype}')


def _check_split(name: str, raw: RawSplits, which: str) -> None:
    images = getattr(raw, f'images_{which}')
    labels = getattr(raw, f'labels_{which}')
    expected = (raw.channel, *raw.im_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DatasetError(f'{name}: {which} images have shape {tuple(images.shape)}, '
                           f'expected (N, {", ".join(map(str, expected))})')
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f'{name}: {which} labels have shape {tuple(labels.shape)}, '
                           f'expected ({images.shape[0]},)')
    num_classes = len(raw.class_names)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DatasetError(f'{name}: {which} labels span [{int(labels.min())}, {int(labels.max())}], '
                           f'expected [0, {num_classes - 1}]')


# Channel statistics another dataset may be normalised with (``load_dataset(normalize_like=...)``).
# CIFAR-10's (VICO-UoE/DatasetCondensation ``utils.get_dataset``), which the CIFAR-100 loaders of
# GeorgeCazenavette/mtt-distillation, NUS-HPC-AI-Lab/DATM and PAD and kaiwang960112/CAFE reuse.
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
SHARED_STATS: dict[str, tuple[list[float], list[float]]] = {'CIFAR10': (CIFAR10_MEAN, CIFAR10_STD)}
# ``load_dataset(normalize_like=TRAIN_STATS)``: the mean/std computed from the training images
# (:func:`train_statistics`) instead of the fixed per-dataset values.
TRAIN_STATS = 'train'


def normalization_name(zca: bool, normalize_like: str | None) -> str:
    """What :func:`load_dataset` applies for these arguments (``DatasetRecord.normalization``):
    ``'zca'``, ``'own'``, ``'train_stats'`` (``normalize_like`` :data:`TRAIN_STATS`) or the
    ``normalize_like`` dataset name."""
    if zca:
        return 'zca'
    return 'train_stats' if normalize_like == TRAIN_STATS else (normalize_like or 'own')


def train_statistics(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population standard deviation of ``images`` (N, C, H, W) over N, H
    and W, accumulated in float64: the statistics of ``get_normalization_data`` in
    google-research/google-research ``kip/KIP.ipynb`` (``np.mean`` / ``np.std`` over all but the
    channel axis, ``ddof=0``), in the units of ``images`` ([0, 1] pixels here; the colab's 0-255
    pixels give the same normalised images).

    Returns:
        ``(mean, std)``, two lists of C floats.

    Raises:
        DatasetError: no images, or a channel with zero variance (nothing to divide by).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise DatasetError(f'training statistics need (N, C, H, W) images with N > 0, got {tuple(images.shape)}')
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    if bool((std == 0).any()):
        raise DatasetError('a channel of the training images is constant: its standard deviation is 0')
    return [float(m) for m in mean], [float(s) for s in std]


def load_dataset(name: str, data_path: str | os.PathLike = 'data', *, zca: bool = False,
                 download: bool = False, res: int | None = None, subset: str | None = None,
                 zca_device: torch.device | str = 'cpu', normalize_like: str | None = None) -> DatasetRecord:
    """Load a registered dataset, normalised or ZCA-whitened, as one :class:`DatasetRecord`.

    Args:
        name: a name from :func:`list_datasets` (an exact match wins; otherwise the match is
            case-insensitive, so ``'imagenette'`` and ``'ImageNette'`` both work).
        data_path: the folder holding the dataset files (layouts are in each loader's docstring).
        zca: skip mean/std normalisation and whiten train and test with a :class:`~data.zca.ZCA`
            (eps=0.1) fitted on the training images (MTT ``--zca``).
        download: let torchvision download MNIST, FashionMNIST, SVHN, CIFAR10/100 into
            ``data_path`` when they are missing (needs internet; the other datasets ignore it).
        res: output side in pixels for the ImageNet subsets (default 128) and MHIST (default 224).
        subset: the ImageNet subset for dataset ``'ImageNet'`` (MTT ``--subset``), e.g. ``'imagewoof'``.
        zca_device: where the ZCA is fitted and applied (a GPU makes CIFAR-size whitening take
            seconds instead of minutes); the whitened images and the ZCA are returned on the CPU.
        normalize_like: ``None`` (the dataset's own fixed mean/std, DC's ``utils.get_dataset``),
            :data:`TRAIN_STATS` (the mean/std computed from the training images,
            :func:`train_statistics`; the KIP colab's ``get_normalization_data``) or a name in
            :data:`SHARED_STATS` (``'CIFAR10'``) whose mean/std normalise the images instead; the
            record's ``mean``/``std`` are then those. Ignored with ``zca`` (no mean/std is applied).

    Returns:
        A :class:`DatasetRecord` with float32 (N, C, H, W) images and int64 labels on the CPU.

    Raises:
        DatasetError: unknown name (the message lists the valid names), missing or malformed files
            (the message names the paths searched and the layout expected), a bad ``res``/``subset``,
            or a ``normalize_like`` that is unknown or has another channel count.
    """
    canonical = _resolve_name(name)
    if normalize_like is not None and normalize_like not in SHARED_STATS and normalize_like != TRAIN_STATS:
        raise DatasetError(f'cannot normalise like {normalize_like!r}; known: {", ".join([*SHARED_STATS, TRAIN_STATS])}')
    if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res <= 0):
        raise DatasetError(f'--res must be a positive integer number of pixels, got {res!r}')
    if subset is not None and not isinstance(subset, str):
        raise DatasetError(f'--subset must be a string, got {subset!r}')
    start = time.perf_counter()
    raw = DATASETS[canonical](os.fspath(data_path), download=download, res=res, subset=subset)
    _check_split(canonical, raw, 'train')
    _check_split(canonical, raw, 'test')
    mean_used, std_used = list(raw.mean), list(raw.std)
    if normalize_like in SHARED_STATS and not zca:
        mean_used, std_used = SHARED_STATS[normalize_like]
        if len(mean_used) != raw.channel:
            raise DatasetError(f'{canonical} has {raw.channel} channel(s); {normalize_like} statistics have '
                               f'{len(mean_used)}')

    images_train = _to_unit_float(raw.images_train)
    images_test = _to_unit_float(raw.images_test)
    if normalize_like == TRAIN_STATS and not zca:
        mean_used, std_used = train_statistics(images_train)
    whitening = None
    if zca:
        device = torch.device(zca_device)
        whitening = ZCA.fit(images_train.to(device), eps=0.1)
        images_train = whitening.transform(images_train.to(device)).cpu()
        images_test = whitening.transform(images_test.to(device)).cpu()
        whitening = whitening.to('cpu')
    else:
        mean = torch.tensor(mean_used, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std_used, dtype=torch.float32).view(1, -1, 1, 1)
        images_train.sub_(mean).div_(std)
        images_test.sub_(mean).div_(std)

    record = DatasetRecord(
        name=raw.name or canonical,
        channel=raw.channel,
        im_size=(int(raw.im_size[0]), int(raw.im_size[1])),
        num_classes=len(raw.class_names),
        class_names=list(raw.class_names),
        mean=[float(m) for m in mean_used],
        std=[float(s) for s in std_used],
        images_train=images_train,
        labels_train=raw.labels_train.to(torch.int64),
        images_test=images_test,
        labels_test=raw.labels_test.to(torch.int64),
        zca=whitening,
        source=raw.source or os.path.abspath(os.fspath(data_path)),
        normalization=normalization_name(zca, normalize_like),
    )
    _logger.info('loaded %s from %s: %d train / %d test images of %s, %d classes%s in %.1f s', record.name,
                 record.source, len(record.labels_train), len(record.labels_test),
                 'x'.join(map(str, (record.channel, *record.im_size))), record.num_classes,
                 ' (ZCA)' if zca else '', time.perf_counter() - start)
    return record
