"""The one reader of files a user hands the toolkit: ``torch.load(weights_only=True)`` within bounds.

:func:`load_plain` reads synthetic sets, checkpoints, expert buffers, score files, original models,
teachers and TinyImageNet's ``.pt``. Two kinds of hostile file are refused in one line
(:class:`PlainDataError`), the first kind before anything in the file is read:

* **code**: a pickle naming any class or function beyond tensors and plain values (``os.system``,
  ``getattr``, a class of some package) is refused by torch's restricted unpickler before anything
  in it is called;
* **size**: a file that would take far more memory than it takes disk space. ``torch.save`` writes
  a zip archive of *stored* (uncompressed) records, so a file whose records declare more bytes than
  the file holds was compressed by something else (a zip bomb: about 1000x for zeros); and a
  tensor whose strides revisit its storage (stride 0, overlapping views) or tensors sharing one
  storage many times over declare far more elements than the file stores, which the first
  ``.float()`` or ``.clone()`` would materialise. Both are measured before anything is copied.

The size limit (:data:`DEFAULT_MAX_BYTES`, 64 GiB: an ImageNet-1K set at ipc 50 and 224 px is
30 GB) is changed per process with :func:`set_max_bytes` (``--max_file_gb``).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
import zipfile
from typing import Iterator, Optional, Sequence

import torch

from .core import DatasetError, one_line

__all__ = ['PlainDataError', 'DEFAULT_MAX_BYTES', 'load_plain', 'set_max_bytes', 'max_bytes', 'declared_bytes']


class PlainDataError(DatasetError):
    """A ``torch.save``'d file that :func:`load_plain` refused (it holds more than plain data, or
    declares more than it holds) or could not read; the one-line message names the file."""


# Bytes any one file may hold or declare; an ImageNet-1K set at ipc 50, 224 px, float32 is 30 GB.
DEFAULT_MAX_BYTES = 64 * 2 ** 30
# Tensors may declare this many times the bytes their storages hold (plus SLACK_BYTES) before the
# file counts as aliased: a labels tensor shared by every experiment is legitimate, a storage
# viewed thousands of times is not.
ALIAS_FACTOR = 4
SLACK_BYTES = 16 * 2 ** 20

_max_bytes = DEFAULT_MAX_BYTES
_GLOBAL_RE = re.compile(r'Unsupported global: GLOBAL (\S+?)(?: was|[:.,]|\s|$)')


def set_max_bytes(limit: Optional[int]) -> None:
    """Set the byte limit of every later :func:`load_plain` in this process (``None``: the default).

    Raises:
        ValueError: ``limit`` is not a positive integer.
    """
    global _max_bytes
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f'the file size limit must be a positive number of bytes, not {limit!r}')
    _max_bytes = DEFAULT_MAX_BYTES if limit is None else limit


def max_bytes() -> int:
    """The byte limit :func:`load_plain` applies now."""
    return _max_bytes


def _gb(count: int) -> str:
    """``count`` bytes in binary units (``'5.12 GiB'``, ``'6.0 KiB'``)."""
    for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if count >= size:
            return f'{count / size:.{1 if unit == "KiB" else 2}f} {unit}'
    return f'{count} B'


def _check_archive(path: str, name: str, limit: int) -> None:
    """Refuse a file larger than ``limit`` or a zip archive whose records declare more bytes than
    the file holds (compressed records; ``torch.save`` writes none), before reading any record.

    Raises:
        PlainDataError: one line naming the file and both sizes.
    """
    on_disk = os.path.getsize(path)
    if on_disk > limit:
        raise PlainDataError(f'{name} is {_gb(on_disk)}, over the limit of {_gb(limit)}; '
                             'raise --max_file_gb if the file is yours')
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: what it holds is what it stores
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise PlainDataError(f'cannot read {name} ({one_line(error)[:200]})') from None
    declared = sum(record.file_size for record in records)
    compressed = [record.filename for record in records if record.compress_type != zipfile.ZIP_STORED]
    if declared > limit or (compressed and declared > 2 * on_disk + SLACK_BYTES):
        raise PlainDataError(f'{name} declares {_gb(declared)} of data in {_gb(on_disk)} on disk'
                             + (f' ({len(compressed)} compressed records; torch.save writes none)' if compressed else '')
                             + f'; the limit is {_gb(limit)} and a file may not inflate beyond its size: refused '
                             'before reading it')


def _tensors(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples (values only; 100 levels at most).

    Raises:
        PlainDataError: nesting deeper than 100 levels (message without a file name; the caller adds it).
    """
    if depth > 100:
        raise PlainDataError('nesting deeper than 100 levels')
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)


def _span(tensor: torch.Tensor) -> int:
    """Elements between the first and last one a strided tensor addresses, both included (0 if empty)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def declared_bytes(value: object, name: str = 'the file') -> tuple:
    """``(declared, stored)``: bytes the tensors in ``value`` declare (elements x element size,
    summed over every tensor) and bytes their distinct storages hold.

    Raises:
        PlainDataError: a tensor that is not a dense strided CPU tensor of real or integer numbers
            (sparse, quantized, on the meta device, complex), or whose strides revisit elements
            (stride 0, overlapping views): one line naming ``name`` and the tensor's shape.
    """
    declared, storages = 0, {}
    for tensor in _tensors(value):
        shape = tuple(tensor.shape)
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != 'cpu':
            kind = ('a quantized tensor' if tensor.is_quantized else f'a {tensor.layout} tensor'
                    if tensor.layout != torch.strided else f'a tensor on the {tensor.device.type} device')
            raise PlainDataError(f'{name} holds {kind} {shape}; only dense CPU tensors are read')
        if tensor.is_complex():
            raise PlainDataError(f'{name} holds a complex tensor {shape} ({tensor.dtype}); images, labels and '
                                 'weights are real numbers')
        if tensor.numel() > _span(tensor):
            raise PlainDataError(f'{name} holds a tensor {shape} of {tensor.numel()} elements laid over '
                                 f'{_span(tensor)} stored ones (stride {tuple(tensor.stride())}); aliased storage '
                                 'is refused')
        declared += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return declared, sum(storages.values())


def load_plain(path: str | os.PathLike, what: str = '', allowed_globals: Sequence = ()) -> object:
    """``torch.load(path, map_location='cpu', weights_only=True)`` within bounds (module docstring):
    tensors and plain Python values (dict, list, tuple, str, numbers, None) only, plus the types in
    ``allowed_globals``; no code from the file ever runs, and a file that declares far more memory
    than it stores is refused before anything is materialised.

    Args:
        path: the file.
        what: what the file is, for the message (``'expert buffer file'``); may be empty.
        allowed_globals: further classes or functions the file may reference (numpy's array
            reconstruction for the RNG state in our checkpoints).

    Returns:
        The loaded object.

    Raises:
        PlainDataError: one line naming ``path``: it is not plain data (and what it references),
            it cannot be read (missing, truncated, not a torch file), it is over :func:`max_bytes`,
            its records are compressed beyond its size, or its tensors are aliased, strided over
            revisited elements, or not dense real-valued CPU tensors.
    """
    name = f'{what} {os.fspath(path)}' if what else os.fspath(path)
    if os.path.isfile(path):
        _check_archive(os.fspath(path), name, _max_bytes)
    allow = getattr(torch.serialization, 'safe_globals', None)  # torch >= 2.5
    context = allow(list(allowed_globals)) if allow and allowed_globals else contextlib.nullcontext()
    try:
        with context, warnings.catch_warnings():
            # torch warns about the pickle protocol of a foreign file before refusing it: one line, not two
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            # and about sparse or quantized tensors, which declared_bytes then refuses in its own line
            warnings.filterwarnings('ignore', message='.*(sparse tensor invariants|TypedStorage is deprecated)')
            value = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:  # torch's restricted unpickler refused something
        text = str(error)
        if 'weights only' in text.lower() or 'WeightsUnpickler' in text:
            found = _GLOBAL_RE.search(text)
            held = f'a reference to {found.group(1)}' if found else 'pickle operations beyond tensors and plain values'
            raise PlainDataError(f'{name} is not plain data: it holds objects other than tensors and plain values '
                                 f'({held}), which could run code when loaded; refused, nothing in it was run') from None
        raise PlainDataError(f'cannot read {name} ({one_line(text)[:200]})') from None
    except Exception as error:  # missing, truncated or foreign: zip, pickle and OS errors share no base class
        raise PlainDataError(f'cannot read {name} ({one_line(error)[:200]})') from None
    try:
        declared, stored = declared_bytes(value, name)
    except PlainDataError as error:
        raise PlainDataError(str(error) if name in str(error) else f'{name}: {error}') from None
    if declared > _max_bytes or declared > ALIAS_FACTOR * stored + SLACK_BYTES:
        raise PlainDataError(f'{name}: its tensors declare {_gb(declared)} over {_gb(stored)} of stored data '
                             f'(views sharing one storage); the limit is {_gb(_max_bytes)} and aliased storage '
                             'beyond a few views is refused')
    return value
