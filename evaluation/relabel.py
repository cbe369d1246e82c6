"""Relabelling a set with a teacher, per crop and epoch, and replaying it: SRe2L's
``relabel/generate_soft_label.py`` without patched PyTorch internals. For every epoch and batch the
student will see, the batch's views (:class:`evaluation.views.Views`: images, crop boxes, flips, mix
permutation, coefficient, CutMix box) and the teacher's logits of those views (float16) are kept in
a :class:`SoftLabelStore`; a student replaying it trains on exactly the views the teacher labelled.
The draw is the online teacher's (:func:`evaluation.student.epoch_views`), so a store made with
seed ``s`` holds the crops and logits an online teacher gives the student trained from seed ``s``.

Files: one ``epoch_{e}.pt`` per epoch in a directory, each readable with
``torch.load(weights_only=True)`` (tensors and plain values only) and self-describing.
Knows no method and no teacher loading: a teacher is a callable.
"""
from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

import progress
import storage
from data import PlainDataError, load_plain
from evaluation.student import epoch_views, query_teacher
from evaluation.views import Views, apply_views
from utils import UserError, make_generator

# Layout version of an ``epoch_{e}.pt`` file.
STORE_VERSION = 1
STORE_FORMAT = "soft_label_store"
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# The protocol settings that decide the views; a store replays only under the same values.
VIEW_SETTINGS = ("student_aug", "min_scale_crops", "max_scale_crops", "mix_type", "cutmix", "mixup")


def view_settings(cfg) -> dict:
    """The view-deciding settings of a protocol (:data:`VIEW_SETTINGS`) as a plain dict."""
    return {name: getattr(cfg, name) for name in VIEW_SETTINGS}


@dataclass
class SoftLabelStore:
    """Per epoch and batch, the views a student sees and the teacher's logits of them.

    Every epoch is a shuffle of the ``num_images`` images cut into batches of ``batch_size``; its
    record (:meth:`epoch_record`) holds, concatenated over the batches in order:

    * ``order`` (N,) int64: the images of the batches, batch after batch;
    * ``boxes`` (N, 4) float32 ``(top, left, height, width)`` fractions and ``flips`` (N,) bool, or
      absent (no crops);
    * ``permutations`` (N,) int64 positions within each batch, ``lams`` (nb,) float64 and
      ``cut_boxes`` (nb, 4) int64 ``(y1, y2, x1, x2)``, or absent (no mixing; a one-image batch
      then has permutation ``[0]`` and coefficient 1);
    * ``logits`` (N, K) float16: the teacher's logits of each view.

    Attributes:
        num_images: N; batch_size: images per batch (the last of an epoch may be smaller).
        im_size: (H, W) of the images the views were drawn for.
        settings: the protocol's :func:`view_settings` the views were drawn under.
        seed: the generator seed of the draw.
        epochs: one record per epoch.
    """

    num_images: int
    batch_size: int
    im_size: Tuple[int, int]
    settings: dict
    seed: int
    epochs: List[dict] = field(default_factory=list)

    # -- building ---------------------------------------------------------------------------------
    def add_epoch(self, batches: Sequence[Tuple[Views, torch.Tensor]]) -> None:
        """Append one epoch from its ``(views, logits (B, K))`` batches, in order."""
        views = [v for v, _ in batches]
        mixing = any(v.permutation is not None for v in views)
        record = {"order": torch.cat([v.index for v in views]),
                  "logits": torch.cat([logits.detach().to("cpu", torch.float16) for _, logits in batches])}
        if views[0].boxes is not None:
            record["boxes"] = torch.cat([v.boxes for v in views]).float()
            record["flips"] = torch.cat([v.flips for v in views]).bool()
        if mixing:
            record["permutations"] = torch.cat([v.permutation if v.permutation is not None else torch.arange(len(v))
                                                for v in views])
            record["lams"] = torch.tensor([v.lam for v in views], dtype=torch.float64)
            record["cut_boxes"] = torch.tensor([list(v.box) if v.box is not None else [0, 0, 0, 0] for v in views],
                                               dtype=torch.int64)
        self.epochs.append(record)

    # -- replay -----------------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterator[Tuple[Views, torch.Tensor]]:
        """The ``(views, logits (B, K) float16)`` of each batch of epoch ``epoch``, in order."""
        record = self.epochs[epoch]
        mix_type = self.settings.get("mix_type", "none")
        for number, start in enumerate(range(0, self.num_images, self.batch_size)):
            part = slice(start, start + self.batch_size)
            boxes = record["boxes"][part] if "boxes" in record else None
            flips = record["flips"][part] if "flips" in record else None
            if "permutations" in record and mix_type != "none" and record["order"][part].numel() > 1:
                box = tuple(int(v) for v in record["cut_boxes"][number]) if mix_type == "cutmix" else None
                views = Views(index=record["order"][part], boxes=boxes, flips=flips, mix_type=mix_type,
                              permutation=record["permutations"][part], lam=float(record["lams"][number]), box=box)
            else:
                views = Views(index=record["order"][part], boxes=boxes, flips=flips)
            yield views, record["logits"][part]

    def check_replay(self, num_images: int, cfg, epochs: int) -> None:
        """Raise ``ValueError`` (one line) unless this store can be replayed for ``num_images``
        images under protocol ``cfg`` for ``epochs`` epochs: same image count, at least that many
        epochs, the protocol's batch size (``--batch_train``, as SRe2L requires) and the same view
        settings (:data:`VIEW_SETTINGS`)."""
        if num_images != self.num_images:
            raise ValueError(f"the relabel store labels {self.num_images} images, the set has {num_images}")
        if len(self.epochs) < epochs:
            raise ValueError(f"the relabel store holds {len(self.epochs)} epochs; the student trains {epochs} "
                             "(relabel with at least that many, or lower --epoch_eval_train)")
        if cfg.batch_train != self.batch_size:
            raise ValueError(f"the relabel store was made with batches of {self.batch_size}; --batch_train is "
                             f"{cfg.batch_train} (they must be equal)")
        wanted = view_settings(cfg)
        if wanted != self.settings:
            differ = ", ".join(f"--{k} {self.settings.get(k)!r} (store) vs {wanted[k]!r}" for k in VIEW_SETTINGS
                               if self.settings.get(k) != wanted[k])
            raise ValueError(f"the relabel store was drawn with other views: {differ}")

    # -- size and files ---------------------------------------------------------------------------
    @staticmethod
    def _bytes(record: dict) -> int:
        return sum(t.numel() * t.element_size() for t in record.values() if isinstance(t, torch.Tensor))

    @property
    def mb_per_epoch(self) -> float:
        """Megabytes (10^6 bytes) of tensors one epoch holds (the mean over epochs; 0 when empty)."""
        if not self.epochs:
            return 0.0
        return sum(self._bytes(r) for r in self.epochs) / len(self.epochs) / 1e6

    def header(self, epoch: int) -> dict:
        """The plain values written in every epoch file beside its tensors."""
        return {"format": STORE_FORMAT, "version": STORE_VERSION, "epoch": epoch, "num_epochs": len(self.epochs),
                "num_images": self.num_images, "batch_size": self.batch_size, "im_size": list(self.im_size),
                "settings": dict(self.settings), "seed": self.seed}

    def save(self, directory: str) -> None:
        """Write ``directory/epoch_{e}.pt`` for every epoch (atomically, one file at a time).

        Raises:
            OSError: a file cannot be written (``storage.atomic_write``).
        """
        os.makedirs(directory, exist_ok=True)
        for epoch, record in enumerate(self.epochs):
            storage.atomic_save({**self.header(epoch), "tensors": dict(record)},
                                os.path.join(directory, f"epoch_{epoch}.pt"))

    @classmethod
    def load(cls, directory: str) -> "SoftLabelStore":
        """Read a store written by :meth:`save` (``torch.load(weights_only=True)``: a file that would
        run code is refused before anything in it runs).

        Raises:
            UserError: one line naming the file: no ``epoch_{e}.pt`` files, missing epochs, a file that
                is not plain data or not a store of this layout, or one that disagrees with epoch 0
                or whose tensors do not fit (shapes, dtypes, indices out of range).
        """
        found = storage.numbered_entries(directory, EPOCH_FILE)
        if not found:
            raise UserError(f"relabel store {directory}: no epoch_{{e}}.pt files")
        if [n for n, _ in found] != list(range(len(found))):
            raise UserError(f"relabel store {directory}: epochs {[n for n, _ in found]} are not 0..{len(found) - 1}")
        store = None
        for epoch, path in found:
            try:
                content = load_plain(path, "relabel store file")
            except PlainDataError as error:
                raise UserError(str(error)) from None
            store = cls._read_epoch(path, epoch, content, store)
        return store

    @classmethod
    def _read_epoch(cls, path: str, epoch: int, content, store: Optional["SoftLabelStore"]) -> "SoftLabelStore":
        """Check one loaded epoch file and add it to ``store`` (created from epoch 0's header)."""
        def bad(why: str) -> UserError:
            return UserError(f"relabel store file {path}: {why}")

        if not isinstance(content, dict) or content.get("format") != STORE_FORMAT:
            raise bad("not a relabel store file")
        if content.get("version") != STORE_VERSION:
            raise bad(f"layout version {content.get('version')!r}, expected {STORE_VERSION}")
        try:
            header = {key: content[key] for key in ("num_images", "batch_size", "im_size", "settings", "seed")}
            tensors = dict(content["tensors"])
            if content["epoch"] != epoch:
                raise bad(f"holds epoch {content['epoch']}")
        except (KeyError, TypeError, ValueError) as error:
            raise bad(f"missing or malformed entry ({error})") from None
        if store is None:
            store = cls(num_images=int(header["num_images"]), batch_size=int(header["batch_size"]),
                        im_size=tuple(int(v) for v in header["im_size"]), settings=dict(header["settings"]),
                        seed=int(header["seed"]))
        elif header != {k: getattr(store, k) if k != "im_size" else list(store.im_size) for k in header}:
            raise bad("its settings differ from epoch 0's")
        count = store.num_images
        expected = {"order": ((count,), torch.int64), "logits": ((count, None), torch.float16),
                    "boxes": ((count, 4), torch.float32), "flips": ((count,), torch.bool),
                    "permutations": ((count,), torch.int64), "lams": ((None,), torch.float64),
                    "cut_boxes": ((None, 4), torch.int64)}
        for key, value in tensors.items():
            if key not in expected or not isinstance(value, torch.Tensor):
                raise bad(f"unexpected entry {key!r}")
            shape, dtype = expected[key]
            if value.dtype != dtype or value.dim() != len(shape) or any(
                    s is not None and s != v for s, v in zip(shape, value.shape)):
                raise bad(f"{key} has shape {tuple(value.shape)} and dtype {value.dtype}")
        if "order" not in tensors or "logits" not in tensors:
            raise bad("no order or logits")
        if sorted(tensors["order"].tolist()) != list(range(count)):
            raise bad("its order is not a permutation of the images")
        store.epochs.append(tensors)
        return store


def relabel(images: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor], *, epochs: int, batch_size: int,
            cfg, seed: int = 0, show_progress: bool = False) -> SoftLabelStore:
    """Label every view a student will see: for each of ``epochs`` epochs, the shuffle and views of
    :func:`evaluation.student.epoch_views` drawn from ``make_generator(seed)`` (the online teacher's
    draw for the student trained from seed ``seed``), the teacher queried on each batch's views
    (:func:`evaluation.views.apply_views`), its logits kept in float16.

    Source: VILA-Lab/SRe2L ``relabel/generate_soft_label.py`` (per epoch and batch: crop coordinates,
    flip, mix index, coefficient, CutMix box and the teacher's logits), without a patched data loader:
    the views are drawn here, not inside PyTorch's fetcher.

    Args:
        images: (N, C, H, W) the set's images (on the teacher's device).
        teacher: ``teacher(x (B, C, H, W)) -> (B, K)`` logits (an ``nn.Module`` in eval mode, frozen).
        epochs: how many epochs to label (``evaluation.student.student_epochs`` of the protocol).
        batch_size: images per batch (the protocol's ``batch_train``).
        cfg: the protocol's student settings (``evaluation.EvalConfig``): ``student_aug`` ``rrc`` or
            ``none``, the crop scales and the mix.
        seed: the generator seed (network ``k`` of an evaluation is trained from ``seed + k``; one store
            serves all networks, as SRe2L's does).
        show_progress: a progress line over the epochs.

    Returns:
        The :class:`SoftLabelStore`.

    Raises:
        ValueError: ``student_aug='dc'`` (DC/DSA augmentation draws are not recorded), ``epochs`` or
            ``batch_size`` below 1, or a teacher that does not return (B, K) logits.
    """
    if cfg.student_aug == "dc":
        raise ValueError("relabelling records crops and mixes only: use --student_aug rrc or none, not dc")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"relabel needs epochs >= 1 and a batch size >= 1 (got {epochs}, {batch_size})")
    images = images.detach()
    im_size = tuple(int(v) for v in images.shape[2:])
    store = SoftLabelStore(num_images=images.shape[0], batch_size=batch_size, im_size=im_size,
                           settings=view_settings(cfg), seed=int(seed))
    generator = make_generator(seed)
    shown = progress.Progress(epochs, "relabel", unit="epoch", leave=False) if show_progress else None
    with shown or nullcontext():
        for epoch in range(epochs):
            relabel_epoch(images, teacher, store, cfg, generator)
            if shown is not None:
                shown.update(1, f"epoch {epoch + 1}/{epochs}")
    return store


def relabel_epoch(images: torch.Tensor, teacher, store: SoftLabelStore, cfg, generator: torch.Generator) -> None:
    """Label one epoch's views (drawn from ``generator``) and add them to ``store``.

    Raises:
        ValueError: the teacher does not return (B, K) logits.
    """
    batches = []
    for views in epoch_views(images.shape[0], store.batch_size, store.im_size, cfg, generator):
        progress.tick()
        x = apply_views(images[views.index.to(images.device)], views)
        logits = query_teacher(teacher, x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the teacher returned shape {tuple(logits.shape)} for {x.shape[0]} images, "
                             "not (B, K) logits")
        batches.append((views, logits))
    store.add_epoch(batches)
