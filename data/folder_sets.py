"""Image-file datasets: TinyImageNet (two layouts), the ImageNet subsets and MHIST.

Folders are read with torchvision's ``ImageFolder`` machinery (a subclass fixes which class folders
are read and their label order) and ``default_loader`` (PIL, converted to RGB), imported when a
folder is read (importing torchvision loads torch._dynamo: over a second). Images are decoded
once into one uint8 (N, 3, res, res) tensor; sizes that differ from res x res go through
``Resize(res)`` (shorter side, antialiased) then ``CenterCrop(res)``. The references resize the
float tensor after ``Normalize``; resizing the PIL image first differs only by uint8 rounding.

There is no automatic download for these datasets; ``download`` is ignored with a warning.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .core import DatasetError, RawSplits, one_line, register_dataset, reject_res, reject_subset
from .plain import PlainDataError, load_plain
from .facts import DEFAULT_RES, IMAGENET_SUBSETS

_logger = logging.getLogger(__name__)

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'IMAGENET_SUBSETS', 'MHIST_CLASSES']

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

MHIST_CLASSES = ('HP', 'SSA')
"""MHIST labels: hyperplastic polyp -> 0, sessile serrated adenoma -> 1."""

_IMAGENET_CLASSES = 1000


def _show(path: str | Path) -> str:
    return repr(os.path.join(str(path), ''))


def _warn_no_download(name: str, download: bool) -> None:
    if download:
        _logger.warning('%s has no automatic download; --download is ignored', name)


class _ToSquareTensor:
    """PIL image -> uint8 (C, res, res): Resize(res) + CenterCrop(res) unless already res x res."""

    def __init__(self, res: int) -> None:
        from torchvision import transforms  # imported when images are read (over a second)
        from torchvision.transforms.functional import pil_to_tensor

        self.res = res
        self.resize = transforms.Resize(res)
        self.crop = transforms.CenterCrop(res)
        self.to_tensor = pil_to_tensor

    def __call__(self, image) -> Tensor:
        if image.size != (self.res, self.res):
            image = self.crop(self.resize(image))
        return self.to_tensor(image)


@functools.cache
def _class_list_folder() -> type:
    """The ``ImageFolder`` subclass over the given class folders only, with the given label of each
    folder (built on first use, so that importing this module does not import torchvision)."""
    from torchvision import datasets

    class ClassListFolder(datasets.ImageFolder):
        def __init__(self, root: str | Path, class_to_idx: dict[str, int], transform: Callable) -> None:
            self._class_to_idx = dict(class_to_idx)
            super().__init__(str(root), transform=transform)

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(self._class_to_idx, key=self._class_to_idx.__getitem__)
            return classes, dict(self._class_to_idx)

    return ClassListFolder


class _ImageList(Dataset):
    """(path, label) pairs read with torchvision's ``default_loader`` (PIL, RGB)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        from torchvision.datasets.folder import default_loader

        self.samples = samples
        self.transform = transform
        self.loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def _image_folder(name: str, root: Path, class_to_idx: dict[str, int], res: int) -> Dataset:
    try:
        return _class_list_folder()(root, class_to_idx, _ToSquareTensor(res))
    except (OSError, ValueError) as err:  # FileNotFoundError: a class folder without images
        raise DatasetError(f'{name}: could not index the images under {_show(root)}: '
                           f'{one_line(err)}') from err


def _decode(name: str, dataset: Dataset, res: int, where: Path) -> tuple[Tensor, Tensor]:
    """Decode every image of ``dataset`` into uint8 (N, 3, res, res) and int64 (N,) labels.

    Uses DataLoader workers (up to 8) for large sets, none for small ones.
    """
    count = len(dataset)
    images = torch.empty((count, 3, res, res), dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    workers = 0 if count < 512 else min(8, os.cpu_count() or 1)
    loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=workers)
    position = 0
    try:
        for batch_images, batch_labels in loader:
            size = batch_labels.shape[0]
            images[position:position + size] = batch_images
            labels[position:position + size] = batch_labels
            position += size
    except (OSError, ValueError, RuntimeError) as err:
        raise DatasetError(f'{name}: could not decode an image under {_show(where)}: '
                           f'{one_line(err)}') from err
    return images, labels


# --------------------------------------------------------------------------------------------------
# TinyImageNet
# --------------------------------------------------------------------------------------------------

_TINY_KEYS = ('classes', 'images_train', 'labels_train', 'images_val', 'labels_val')


def _tiny_from_pt(path: Path) -> RawSplits:
    try:
        data = load_plain(path, 'TinyImageNet file')
    except PlainDataError as err:  # unreadable, or a pickle that would run code
        raise DatasetError(f"{err}; expected a torch.save'd dict with keys {', '.join(_TINY_KEYS)} "
                           "(tensors and a list of class names)") from None
    if not isinstance(data, dict) or any(key not in data for key in _TINY_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f'{str(path)!r} must be a dict with keys {", ".join(_TINY_KEYS)}; found {found}')
    images_train, images_val = data['images_train'], data['images_val']
    for key in ('images_train', 'images_val'):
        images = data[key]
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DatasetError(f"{str(path)!r}: '{key}' must be a uint8 N x 3 x H x W tensor, got {shape}")
    classes = data['classes']
    if not isinstance(classes, (list, tuple)) or not classes:
        found = f'{len(classes)} names' if isinstance(classes, (list, tuple)) else type(classes).__name__
        raise DatasetError(f"{str(path)!r}: 'classes' must be a non-empty list of class names, got {found}")
    labels = {}
    for key, images in (('labels_train', images_train), ('labels_val', images_val)):
        value = data[key]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = torch.tensor(value, dtype=torch.int64).reshape(-1)
        if not isinstance(value, Tensor) or value.ndim != 1 or value.dtype.is_floating_point or \
                value.dtype.is_complex or value.dtype == torch.bool or value.shape[0] != images.shape[0]:
            shape = f'{value.dtype} {tuple(value.shape)}' if isinstance(value, Tensor) else type(value).__name__
            raise DatasetError(f"{str(path)!r}: '{key}' must be an integer tensor of {images.shape[0]} labels "
                               f'(one per image), got {shape}')
        labels[key] = value.to(torch.int64)
    in_range = labels['labels_train'][(labels['labels_train'] >= 0) & (labels['labels_train'] < len(classes))]
    empty = [str(classes[k]) for k, n in enumerate(torch.bincount(in_range, minlength=len(classes)).tolist()) if n == 0]
    if empty:
        raise DatasetError(f"{str(path)!r}: {len(empty)} of the {len(classes)} classes have no training image "
                           f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); every class in 'classes' "
                           "needs at least one")
    return RawSplits(
        channel=3, im_size=(int(images_train.shape[2]), int(images_train.shape[3])),
        class_names=[str(c) for c in classes], mean=IMAGENET_MEAN, std=IMAGENET_STD,
        images_train=images_train, labels_train=labels['labels_train'],
        images_test=images_val, labels_test=labels['labels_val'])


def _tiny_from_folders(train_dir: Path, val_dir: Path) -> RawSplits:
    from torchvision.datasets.folder import find_classes

    try:
        wnids, class_to_idx = find_classes(str(train_dir))
        val_wnids, _ = find_classes(str(val_dir))
    except FileNotFoundError as err:
        raise DatasetError(f'TinyImageNet: {one_line(err)}; expected class folders '
                           f"'train/<wnid>/' and 'val/images/<wnid>/'") from err
    unknown = sorted(set(val_wnids) - set(wnids))
    if unknown:
        raise DatasetError(f'TinyImageNet: {_show(val_dir)} has class folders missing from '
                           f'{_show(train_dir)}: {", ".join(unknown[:5])}')
    train = _image_folder('TinyImageNet', train_dir, class_to_idx, 64)
    val = _image_folder('TinyImageNet', val_dir, {w: class_to_idx[w] for w in val_wnids}, 64)
    images_train, labels_train = _decode('TinyImageNet', train, 64, train_dir)
    images_val, labels_val = _decode('TinyImageNet', val, 64, val_dir)
    return RawSplits(
        channel=3, im_size=(64, 64), class_names=list(wnids), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        images_train=images_train, labels_train=labels_train,
        images_test=images_val, labels_test=labels_val)


@register_dataset('Tiny')
@register_dataset('TinyImageNet')
def load_tiny_imagenet(data_path: str, *, download: bool = False, res: int | None = None,
                       subset: str | None = None) -> RawSplits:
    """TinyImageNet, 3x64x64, 200 classes, ImageNet mean/std; names 'TinyImageNet' and 'Tiny'.

    Tries, in order:

    1. ``data_path/tinyimagenet.pt`` (DC, DM, DataDAM): a dict with keys ``classes``,
       ``images_train``, ``labels_train``, ``images_val``, ``labels_val``; images uint8
       N x 3 x 64 x 64 (divided by 255 before normalisation; float images are taken as [0, 1]).
    2. ImageFolder layout (MTT, DATM, PAD): ``data_path/train/<wnid>/...`` and
       ``data_path/val/images/<wnid>/...`` (val already sorted into class folders); labels follow
       the sorted wnids of ``train``, which are also the class names.

    Raises:
        DatasetError: neither layout found, malformed files, or ``res``/``subset`` given.
    """
    reject_res('TinyImageNet', res)
    reject_subset('TinyImageNet', subset)
    _warn_no_download('TinyImageNet', download)
    pt_file = Path(data_path) / 'tinyimagenet.pt'
    if pt_file.is_file():
        return _tiny_from_pt(pt_file)
    train_dir, val_dir = Path(data_path) / 'train', Path(data_path) / 'val' / 'images'
    if train_dir.is_dir() and val_dir.is_dir():
        return _tiny_from_folders(train_dir, val_dir)
    raise DatasetError(f"TinyImageNet not found under {_show(data_path)}: expected 'tinyimagenet.pt' (a dict "
                       f"with keys {', '.join(_TINY_KEYS)}; DC/DM/DataDAM layout) or the ImageFolder "
                       f"folders 'train/<wnid>/' and 'val/images/<wnid>/' (MTT/DATM/PAD layout)")


# --------------------------------------------------------------------------------------------------
# ImageNet subsets
# --------------------------------------------------------------------------------------------------

def _imagenet_class_names(data_path: str, wnids: list[str]) -> list[str]:
    """Human-readable names from torchvision's ImageNet ``meta.bin`` if present, else the wnids."""
    if not (Path(data_path) / 'meta.bin').is_file():
        return list(wnids)
    from torchvision.datasets.imagenet import load_meta_file

    try:
        wnid_to_classes = load_meta_file(data_path)[0]
        return [wnid_to_classes[w][0] if w in wnid_to_classes else w for w in wnids]
    except Exception as err:  # an unreadable meta.bin only costs the pretty names
        _logger.warning('could not read %s (%s); using wnids as class names',
                        Path(data_path) / 'meta.bin', one_line(err))
        return list(wnids)


def _load_imagenet_subset(subset: str, data_path: str, res: int | None) -> RawSplits:
    """Read one 10-class subset from an ImageNet-1K ImageFolder (see :func:`load_imagenet`)."""
    side = DEFAULT_RES['ImageNet'] if res is None else res
    train_dir, val_dir = Path(data_path) / 'train', Path(data_path) / 'val'
    layout = (f"an ImageNet-1K ImageFolder: {_show(train_dir)} holding all 1000 class folders "
              f"'<wnid>/' (label index i = the i-th wnid in sorted order, as ImageFolder gives) "
              f"and {_show(val_dir)} with '<wnid>/' folders for the subset's classes")
    if not train_dir.is_dir():
        raise DatasetError(f'{subset} not found under {_show(data_path)}: expected {layout}')
    wnids = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if len(wnids) != _IMAGENET_CLASSES:
        raise DatasetError(f'{subset}: found {len(wnids)} class folders in {_show(train_dir)}, expected '
                           f'{layout}')
    chosen = [wnids[index] for index in IMAGENET_SUBSETS[subset]]
    missing = [w for w in chosen if not (val_dir / w).is_dir()]
    if missing:
        raise DatasetError(f'{subset}: missing validation folders {", ".join(missing)} under '
                           f'{_show(val_dir)}; expected {layout}')
    class_to_idx = {w: label for label, w in enumerate(chosen)}
    train = _image_folder(subset, train_dir, class_to_idx, side)
    val = _image_folder(subset, val_dir, class_to_idx, side)
    images_train, labels_train = _decode(subset, train, side, train_dir)
    images_val, labels_val = _decode(subset, val, side, val_dir)
    return RawSplits(
        channel=3, im_size=(side, side), class_names=_imagenet_class_names(data_path, chosen),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, images_train=images_train, labels_train=labels_train,
        images_test=images_val, labels_test=labels_val, name=subset)


@register_dataset('ImageNet')
def load_imagenet(data_path: str, *, download: bool = False, res: int | None = None,
                  subset: str | None = None) -> RawSplits:
    """A 10-class ImageNet subset picked by ``subset`` (MTT ``--dataset ImageNet --subset ...``).

    The subsets are also registered under their own names (imagenette, imagewoof, imagefruit,
    imagemeow, imagesquawk, imageyellow). Class indices are :data:`IMAGENET_SUBSETS`.

    Layout: an ImageNet-1K ImageFolder, ``data_path/train/<wnid>/`` with all 1000 class folders
    (ImageNet class index i is the i-th wnid in sorted order, as ``ImageFolder`` gives; only the
    subset's 10 folders are read, the rest only need to exist) and ``data_path/val/<wnid>/`` for the
    subset's classes. Images are resized to ``res`` x ``res`` (default 128) with Resize(res) +
    CenterCrop(res); ImageNet mean/std. Class names come from torchvision's ``data_path/meta.bin``
    when present, else they are the wnids. The record is named after the subset.

    Raises:
        DatasetError: unknown or missing ``subset``, or a missing or incomplete folder layout.
    """
    key = subset.lower() if isinstance(subset, str) else None
    if key not in IMAGENET_SUBSETS:
        raise DatasetError(f"dataset 'ImageNet' needs --subset, one of {', '.join(IMAGENET_SUBSETS)}; "
                           f'got {subset!r}')
    _warn_no_download('ImageNet', download)
    return _load_imagenet_subset(key, data_path, res)


def _subset_loader(name: str):
    def loader(data_path: str, *, download: bool = False, res: int | None = None,
               subset: str | None = None) -> RawSplits:
        if subset is not None and subset.lower() != name:
            raise DatasetError(f'dataset {name!r} is already an ImageNet subset; got --subset {subset!r}')
        _warn_no_download(name, download)
        return _load_imagenet_subset(name, data_path, res)

    loader.__name__ = loader.__qualname__ = f'load_{name}'
    loader.__doc__ = (f'ImageNet subset {name!r}: ImageNet-1K classes {IMAGENET_SUBSETS[name]}; '
                      f'layout and errors as :func:`load_imagenet`.')
    return loader


for _name in IMAGENET_SUBSETS:
    register_dataset(_name)(_subset_loader(_name))


# --------------------------------------------------------------------------------------------------
# MHIST
# --------------------------------------------------------------------------------------------------

_MHIST_COLUMNS = ('Image Name', 'Majority Vote Label', 'Partition')


def _channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] units of uint8 (N, C, H, W) images.

    A constant channel (std 0) gets std 1 so that normalisation stays finite.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(256):
        pixels = chunk.to(torch.float64) / 255.0
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std[std < 1e-8] = 1.0
    return mean.tolist(), std.tolist()


@register_dataset('MHIST')
def load_mhist(data_path: str, *, download: bool = False, res: int | None = None,
               subset: str | None = None) -> RawSplits:
    """MHIST colorectal polyp images, 2 classes (HP -> 0, SSA -> 1), resized to ``res`` (default 224).

    Layout: ``data_path/annotations.csv`` with columns 'Image Name', 'Majority Vote Label'
    (HP/SSA) and 'Partition' (train/test), and the images in ``data_path/images/<Image Name>``.

    Mean/std are computed from the training split after resizing (per channel over all pixels).
    The stored DataDistillation/DataDAM ``utils.py`` versions (714d91c, d58dec2) contain no MHIST
    branch; the public DataDAM-based MHIST code found (ECE1512 course projects built on DataDAM's
    utils) normalises with MHIST training-split statistics, not ImageNet's, so we do the same.

    Raises:
        DatasetError: missing csv/images, unknown label or partition, an image name that leaves
            ``images/`` (absolute, or through ``..``), an empty split, or ``subset``.
    """
    reject_subset('MHIST', subset)
    _warn_no_download('MHIST', download)
    side = DEFAULT_RES['MHIST'] if res is None else res
    csv_path, image_dir = Path(data_path) / 'annotations.csv', Path(data_path) / 'images'
    layout = (f"'annotations.csv' (columns {', '.join(map(repr, _MHIST_COLUMNS))}; labels HP/SSA, "
              f"partitions train/test) and 'images/<Image Name>'")
    if not csv_path.is_file() or not image_dir.is_dir():
        raise DatasetError(f'MHIST not found under {_show(data_path)}: expected {layout}')
    samples: dict[str, list[tuple[str, int]]] = {'train': [], 'test': []}
    with open(csv_path, newline='', encoding='utf-8-sig') as handle:
        reader = csv.DictReader(handle)
        absent = [column for column in _MHIST_COLUMNS if column not in (reader.fieldnames or [])]
        if absent:
            raise DatasetError(f'{str(csv_path)!r} lacks column(s) {", ".join(map(repr, absent))}; found '
                               f'{reader.fieldnames}; expected {layout}')
        for line, row in enumerate(reader, start=2):
            label, partition = row['Majority Vote Label'].strip(), row['Partition'].strip().lower()
            if label not in MHIST_CLASSES or partition not in samples:
                raise DatasetError(f'{str(csv_path)!r} line {line}: label {label!r} / partition '
                                   f'{partition!r}; expected HP or SSA / train or test')
            name = row['Image Name'].strip()
            inside = os.path.normpath(name)
            if not name or os.path.isabs(name) or inside == os.pardir or inside.startswith(os.pardir + os.sep):
                raise DatasetError(f'{str(csv_path)!r} line {line}: image name {name!r} is not a file name inside '
                                   f"{str(image_dir)!r}; expected {layout}")
            samples[partition].append((str(image_dir / inside), MHIST_CLASSES.index(label)))
    every = samples['train'] + samples['test']
    missing = [path for path, _ in every if not os.path.isfile(path)]
    if missing:
        raise DatasetError(f'MHIST: {len(missing)} image(s) listed in {str(csv_path)!r} are missing, e.g. '
                           f'{missing[0]!r}; expected {layout}')
    empty = [split for split, rows in samples.items() if not rows]
    if empty:
        raise DatasetError(f'MHIST: {str(csv_path)!r} has no {" or ".join(empty)} rows')
    images_train, labels_train = _decode('MHIST', _ImageList(samples['train'], _ToSquareTensor(side)),
                                         side, image_dir)
    images_test, labels_test = _decode('MHIST', _ImageList(samples['test'], _ToSquareTensor(side)),
                                       side, image_dir)
    mean, std = _channel_stats(images_train)
    return RawSplits(
        channel=3, im_size=(side, side), class_names=list(MHIST_CLASSES), mean=mean, std=std,
        images_train=images_train, labels_train=labels_train,
        images_test=images_test, labels_test=labels_test)
