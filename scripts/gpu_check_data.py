#!/usr/bin/env python3
"""Fashion-MNIST for ``scripts/gpu_check.py``: the first images of each class of the four ``.gz``
IDX files (Debian's names, as in ``/usr/share/datasets/fashion-mnist``), written uncompressed in
torchvision's layout ``ROOT/FashionMNIST/raw``, or a generated miniature in the same layout for
the dry run. Run alone, it writes the subset the check uses (about 1 MB instead of 30 MB to carry):

    python3 scripts/gpu_check_data.py --data_path /usr/share/datasets/fashion-mnist --out shared/fmnist_small
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys

import torch

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


class DataError(ValueError):
    """A Fashion-MNIST file is missing or unreadable; the message names ``--data_path``."""


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (``.gz`` or plain) as a uint8 tensor: (N, 28, 28) images or (N,) labels.

    Raises:
        DataError: the file is missing or not IDX.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise DataError(f"--data_path: cannot read {path} ({error})") from None
    magic = struct.unpack(">I", data[:4])[0]
    dims = magic & 0xFF
    if magic >> 8 != 0x08 or dims not in (1, 3):
        raise DataError(f"--data_path: {path} is not an IDX file of bytes")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: str, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor of 1 or 3 dimensions as an uncompressed IDX file."""
    header = struct.pack(">I", 0x0800 | tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    with open(path, "wb") as handle:
        handle.write(header + tensor.contiguous().numpy().tobytes())


def write_subset(data_path: str, root: str, train_per_class: int, test_count: int) -> str:
    """The first ``train_per_class`` training images of each class (in file order) and the first
    ``test_count`` test images of Fashion-MNIST in ``data_path`` (``NAME.gz`` or ``NAME``, there or
    in ``data_path/FashionMNIST/raw``), written
    uncompressed to ``root/FashionMNIST/raw``; returns ``root``.

    Raises:
        DataError: a file is missing or unreadable (the message names ``--data_path``).
    """
    def find(name):
        raw = os.path.join(data_path, "FashionMNIST", "raw")  # a subset this script wrote
        for candidate in (os.path.join(data_path, name + ".gz"), os.path.join(data_path, name),
                          os.path.join(raw, name), os.path.join(raw, name + ".gz")):
            if os.path.isfile(candidate):
                return candidate
        raise DataError(f"--data_path {data_path}: no {name}.gz (Fashion-MNIST's four .gz files belong there)")

    images, labels, test_images, test_labels = (read_idx(find(name)) for name in FMNIST_FILES)
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:train_per_class] for c in range(10)]).sort().values
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name, tensor in zip(FMNIST_FILES, (images[keep], labels[keep], test_images[:test_count],
                                           test_labels[:test_count])):
        write_idx(os.path.join(raw, name), tensor)
    return root


def write_miniature(root: str, train_per_class: int, test_count: int) -> str:
    """A generated ten-class 28x28 set in the IDX layout ``root/FashionMNIST/raw`` (each class a
    different mean brightness, so that networks learn it); returns ``root``."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train_per_class * 10), ("t10k", test_count)):
        labels = torch.arange(10).repeat(count // 10 + 1)[:count].sort().values
        images = torch.rand(count, 28, 28, generator=generator) * 100 + labels.view(-1, 1, 1) * 15
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images.clamp(0, 255).to(torch.uint8))
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels.to(torch.uint8))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="folder holding Fashion-MNIST's four .gz IDX files")
    parser.add_argument("--out", required=True, help="folder written: OUT/FashionMNIST/raw/<four IDX files>")
    parser.add_argument("--train_per_class", type=int, default=100, help="training images per class (default 100, "
                        "as scripts/gpu_check.py)")
    parser.add_argument("--test_count", type=int, default=500, help="first test images (default 500)")
    args = parser.parse_args(argv)
    try:
        write_subset(args.data_path, args.out, args.train_per_class, args.test_count)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'FashionMNIST', 'raw')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
