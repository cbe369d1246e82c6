"""MNIST, FashionMNIST, SVHN, CIFAR10 and CIFAR100 through torchvision's readers.

Shapes, class counts and mean/std are the DC-utils table (VICO-UoE/DatasetCondensation
``utils.get_dataset``; docs/reference-notes.md, *Datasets and normalisation*). CIFAR100 uses its
own mean/std as in DC/DSA/DM and CLoM (CAFE, MTT, DATM and PAD reuse the CIFAR10 values, a
copy-paste quirk: ``load_dataset(..., normalize_like='CIFAR10')`` reproduces it).

The readers' ``.data``/``.targets`` arrays are used directly (no per-image PIL loop). torchvision is
called with ``download=False`` unless the caller asks for ``download=True``.

MNIST-style IDX files are also found gzipped (e.g. Debian's ``dataset-fashion-mnist`` package in
``/usr/share/datasets/fashion-mnist/``): they are decompressed once into a cache folder
(``$DD_CACHE``, default ``~/.cache/dd-toolkit``) that torchvision then reads.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .core import CIFAR10_MEAN, CIFAR10_STD, DatasetError, RawSplits, one_line, register_dataset, reject_res, reject_subset

_logger = logging.getLogger(__name__)

__all__ = ['cache_dir', 'FASHION_MNIST_SYSTEM_DIR']

CACHE_ENV = 'DD_CACHE'
FASHION_MNIST_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
_IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
              't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
_DOWNLOAD_HINT = '(pass --data_path, or --download on a machine with internet)'


def _datasets():
    """``torchvision.datasets``, imported on first use: importing torchvision costs over a second
    (it loads ``torch._dynamo``), which a command that reads no dataset (``--help``, a flag
    refused, a table) need not pay."""
    from torchvision import datasets
    return datasets


def cache_dir() -> Path:
    """The toolkit's cache folder: ``$DD_CACHE`` if set, else ``~/.cache/dd-toolkit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'dd-toolkit').expanduser()


def _show(path: str | Path) -> str:
    """A folder as the user wrote it, with a trailing slash, quoted."""
    return repr(os.path.join(str(path), ''))


def _open_splits(open_split: Callable[[bool], Any], download: bool, where: str, expected: str) -> tuple[Any, Any]:
    """Open a torchvision dataset's train and test splits, turning any read or download failure
    into a one-line ``DatasetError``.

    Args:
        open_split: ``open_split(train: bool)`` builds the torchvision dataset of one split.
        download: whether a download was allowed (changes the wording only).
        where: the searched location, for the message.
        expected: what should be there, for the message.

    Raises:
        DatasetError: the reader failed (corrupt or incomplete files, failed download, scipy missing).
    """
    try:
        return open_split(True), open_split(False)
    except ImportError as err:
        raise DatasetError(f'reading from {where} needs a missing package: {one_line(err)}') from err
    except (RuntimeError, OSError, ValueError) as err:
        verb = 'download or read' if download else 'read'
        raise DatasetError(f'could not {verb} {where} ({one_line(err)}); expected {expected}') from err


def _decompress_to_cache(dataset: str, source: Path) -> str:
    """Gunzip the four IDX files of ``source`` into ``<cache>/<dataset>-<hash>/<dataset>/raw``.

    The hash of the absolute source folder keeps different sources apart. A cached file is reused
    while it is newer than its .gz; files are written to a temporary name and renamed, so an
    interrupted run never leaves a truncated file behind.

    Returns:
        The torchvision ``root`` to read from.
    """
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / f'{dataset.lower()}-{key}'
    raw = root / dataset / 'raw'
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in _IDX_FILES:
            packed, target = source / f'{name}.gz', raw / name
            if target.is_file() and target.stat().st_mtime >= packed.stat().st_mtime:
                continue
            partial = raw / f'{name}.partial-{os.getpid()}'
            with gzip.open(packed, 'rb') as src, open(partial, 'wb') as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(partial, target)
            _logger.info('decompressed %s -> %s', packed, target)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f'could not decompress the {dataset} IDX files from {_show(source)} into '
                           f'{_show(raw)} (set ${CACHE_ENV} to a writable folder): {one_line(err)}') from err
    return str(root)


def _find_idx_root(dataset: str, data_path: str,
                   system_dirs: tuple[str, ...]) -> tuple[str | None, str | None, list[str]]:
    """Find a torchvision ``root`` for an MNIST-style dataset.

    Search order: ``data_path/<dataset>/raw/`` with the uncompressed IDX files (torchvision's
    layout); then the four ``.gz`` files in ``data_path/<dataset>/raw/``, ``data_path`` itself and
    each of ``system_dirs`` (decompressed into the cache).

    Returns:
        (root or None, the folder the files were found in or None, the folders searched, for
        error messages).
    """
    raw = Path(data_path) / dataset / 'raw'
    if all((raw / name).is_file() for name in _IDX_FILES):
        return data_path, str(raw), [str(raw)]
    searched = [str(raw), data_path, *system_dirs]
    for folder in (raw, Path(data_path), *map(Path, system_dirs)):
        if all((folder / f'{name}.gz').is_file() for name in _IDX_FILES):
            return _decompress_to_cache(dataset, folder), str(folder), searched
    return None, None, searched


def _load_idx_dataset(dataset: str, reader: type, data_path: str, download: bool,
                      system_dirs: tuple[str, ...], mean: float, std: float) -> RawSplits:
    root, found, searched = _find_idx_root(dataset, data_path, system_dirs)
    if root is None and not download:
        folders = ', '.join(_show(folder) for folder in searched)
        raise DatasetError(f'{dataset} not found: searched {folders}; expected the IDX files '
                           f"{', '.join(_IDX_FILES)} uncompressed in '<data_path>/{dataset}/raw/' "
                           f'(torchvision layout) or as .gz files {_DOWNLOAD_HINT}')
    if root is None:
        root = data_path
    train, test = _open_splits(lambda is_train: reader(root, train=is_train, download=download), download,
                               f'{dataset} from {_show(root)}',
                               f"the IDX files in '{os.path.join(root, dataset, 'raw', '')}'")
    return RawSplits(
        channel=1, im_size=(28, 28), class_names=list(train.classes), mean=[mean], std=[std],
        images_train=train.data.unsqueeze(1), labels_train=train.targets.to(torch.int64),
        images_test=test.data.unsqueeze(1), labels_test=test.targets.to(torch.int64),
        source=os.path.abspath(found or root))


@register_dataset('MNIST')
def load_mnist(data_path: str, *, download: bool = False, res: int | None = None,
               subset: str | None = None) -> RawSplits:
    """MNIST, 1x28x28, 10 classes, mean 0.1307, std 0.3081 (torchvision ``MNIST``).

    Layout: ``data_path/MNIST/raw/`` with the four IDX files (uncompressed), or their ``.gz``
    files in ``data_path/MNIST/raw/`` or ``data_path``.

    Raises:
        DatasetError: files missing or unreadable, or ``res``/``subset`` given.
    """
    reject_res('MNIST', res)
    reject_subset('MNIST', subset)
    return _load_idx_dataset('MNIST', _datasets().MNIST, data_path, download, (), 0.1307, 0.3081)


@register_dataset('FashionMNIST')
def load_fashion_mnist(data_path: str, *, download: bool = False, res: int | None = None,
                       subset: str | None = None) -> RawSplits:
    """FashionMNIST, 1x28x28, 10 classes, mean 0.2861, std 0.3530 (torchvision ``FashionMNIST``).

    Search order: ``data_path/FashionMNIST/raw/`` (uncompressed IDX, torchvision layout); the
    ``.gz`` files in ``data_path/FashionMNIST/raw/`` or ``data_path`` (Debian names,
    ``train-images-idx3-ubyte.gz`` ...); then ``/usr/share/datasets/fashion-mnist/`` (Debian's
    ``dataset-fashion-mnist`` package), so ``load_dataset('FashionMNIST')`` works from any folder.
    Gzipped files are decompressed once into ``$DD_CACHE`` (default ``~/.cache/dd-toolkit``);
    torchvision's md5 check of .gz files is bypassed because Debian recompresses them.

    Raises:
        DatasetError: files missing or unreadable, or ``res``/``subset`` given.
    """
    reject_res('FashionMNIST', res)
    reject_subset('FashionMNIST', subset)
    return _load_idx_dataset('FashionMNIST', _datasets().FashionMNIST, data_path, download,
                             (FASHION_MNIST_SYSTEM_DIR,), 0.2861, 0.3530)


@register_dataset('SVHN')
def load_svhn(data_path: str, *, download: bool = False, res: int | None = None,
              subset: str | None = None) -> RawSplits:
    """SVHN, 3x32x32, 10 classes (digit 0 is label 0), splits 'train'/'test' (torchvision ``SVHN``).

    Layout: ``data_path/train_32x32.mat`` and ``data_path/test_32x32.mat``; reading needs scipy.
    Mean (0.4377, 0.4438, 0.4728), std (0.1980, 0.2010, 0.1970).

    Raises:
        DatasetError: files missing or corrupted, scipy missing, or ``res``/``subset`` given.
    """
    reject_res('SVHN', res)
    reject_subset('SVHN', subset)
    files = ('train_32x32.mat', 'test_32x32.mat')
    missing = [name for name in files if not (Path(data_path) / name).is_file()]
    if missing and not download:
        raise DatasetError(f"SVHN not found under {_show(data_path)}: expected torchvision's "
                           f"{' and '.join(files)} there (missing {', '.join(missing)}) {_DOWNLOAD_HINT}")
    train, test = _open_splits(
        lambda is_train: _datasets().SVHN(data_path, split='train' if is_train else 'test', download=download),
        download, f'SVHN under {_show(data_path)}',
        f"torchvision's {' and '.join(files)} there (reading needs scipy) {_DOWNLOAD_HINT}")
    return RawSplits(
        channel=3, im_size=(32, 32), class_names=[str(c) for c in range(10)],
        mean=[0.4377, 0.4438, 0.4728], std=[0.1980, 0.2010, 0.1970],
        images_train=torch.from_numpy(train.data).contiguous(),
        labels_train=torch.from_numpy(train.labels).to(torch.int64),
        images_test=torch.from_numpy(test.data).contiguous(),
        labels_test=torch.from_numpy(test.labels).to(torch.int64))


def _load_cifar(name: str, reader: type, folder: str, data_path: str, download: bool, res: int | None,
                subset: str | None, mean: list[float], std: list[float]) -> RawSplits:
    """CIFAR10 / CIFAR100 from torchvision's ``folder`` under ``data_path`` (uint8 3x32x32).

    Raises:
        DatasetError: folder missing or corrupted, or ``res``/``subset`` given.
    """
    reject_res(name, res)
    reject_subset(name, subset)
    if not download and not (Path(data_path) / folder).is_dir():
        raise DatasetError(f"{name} not found under {_show(data_path)}: expected torchvision's "
                           f"'{folder}/' folder there {_DOWNLOAD_HINT}")
    train, test = _open_splits(lambda is_train: reader(data_path, train=is_train, download=download), download,
                               f'{name} under {_show(data_path)}',
                               f"torchvision's complete '{folder}/' folder there {_DOWNLOAD_HINT}")
    return RawSplits(
        channel=3, im_size=(32, 32), class_names=list(train.classes), mean=mean, std=std,
        images_train=torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(),
        labels_train=torch.tensor(train.targets, dtype=torch.int64),
        images_test=torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(),
        labels_test=torch.tensor(test.targets, dtype=torch.int64))


@register_dataset('CIFAR10')
def load_cifar10(data_path: str, *, download: bool = False, res: int | None = None,
                 subset: str | None = None) -> RawSplits:
    """CIFAR10, 3x32x32, 10 classes (torchvision ``CIFAR10``).

    Layout: ``data_path/cifar-10-batches-py/``. Mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994,
    0.2010).

    Raises:
        DatasetError: folder missing or corrupted, or ``res``/``subset`` given.
    """
    return _load_cifar('CIFAR10', _datasets().CIFAR10, 'cifar-10-batches-py', data_path, download, res, subset,
                       list(CIFAR10_MEAN), list(CIFAR10_STD))


@register_dataset('CIFAR100')
def load_cifar100(data_path: str, *, download: bool = False, res: int | None = None,
                  subset: str | None = None) -> RawSplits:
    """CIFAR100, 3x32x32, 100 fine classes (torchvision ``CIFAR100``).

    Layout: ``data_path/cifar-100-python/``. Mean (0.5071, 0.4866, 0.4409), std (0.2673, 0.2564,
    0.2762), as in DC/DSA/DM and CLoM.

    Raises:
        DatasetError: folder missing or corrupted, or ``res``/``subset`` given.
    """
    return _load_cifar('CIFAR100', _datasets().CIFAR100, 'cifar-100-python', data_path, download, res, subset,
                       [0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762])
