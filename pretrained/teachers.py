"""Teachers: trained networks whose logits label images for the soft-label family of methods and
evaluations (SRe2L, CDA, RDED, "random real + teacher labels").

A teacher is one or more frozen networks in eval mode; its output is the mean of their logits
(several teachers averaged, as RDED's ``--subsidiary-arch`` ensembles and Qin et al.'s teacher
ensembles do). The networks come from

* ``train_original.py`` models (:mod:`pretrained.originals`): ``{teacher_dir}/{dataset}/original/
  {model}/index_{i}/checkpoint.pt`` (the finished model) or ``epoch_{E}.pt`` (the weights after
  epoch E, ``train_original.py --save_epochs``; an early-stopped expert is often the better
  teacher: "A Label is Worth a Thousand Images", Qin et al., NeurIPS 2024, Table 7), or
* a torchvision (``resnet18``) or timm (``timm:resnet18``) architecture, or a ``networks.py`` name,
  with the weights of a local file (SRe2L's ``--arch-name resnet18`` teachers,
  VILA-Lab/SRe2L ``recover/data_synthesis.py``; nothing is downloaded).

Every file is read with ``torch.load(..., weights_only=True)`` (``data.load_plain``): a file that
would run code when unpickled is refused in one line and nothing in it runs. Every mismatch between
a teacher and the data (classes, channels, image size, ZCA whitening, weights that do not fit the
architecture, a missing file) is one ``utils.UserError`` line; a missing ``train_original.py``
model names the command that makes it.

A torchvision/timm file with 1000 outputs used on an ImageNet subset (imagenette, imagewoof, ...)
is kept whole and its logits are restricted to the subset's ImageNet-1K classes
(``data.IMAGENET_SUBSETS``, in label order); the softmax over those logits is the teacher's
distribution conditioned on the subset.

Public API: :class:`TeacherSpec`, :class:`Teacher`, :func:`load_teacher`,
:func:`check_same_teacher`, :class:`SelectClasses`, :func:`weights_sha256`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import networks
import utils
from data import IMAGENET_SUBSETS, PlainDataError, load_plain
from pretrained import original_files

logger = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------
# The specification (what the flags ask for)
# --------------------------------------------------------------------------------------------
def _names(values: Iterable) -> Tuple[str, ...]:
    return tuple(str(value) for value in values)


@dataclass(frozen=True)
class TeacherSpec:
    """Which networks make the teacher (``cli/teacher_flags.py`` resolves the flags into one).

    Attributes:
        models: ``train_original.py`` model names (``--teacher_model ConvNetBN,ResNet18BN``).
        directory: their ``train_original.py --save_path`` (``--teacher_dir``).
        indices: model indices of each of ``models`` (``--teacher_index 0,1``): every model at
            every index is one network.
        epoch: ``None`` for the finished models, else the weights after that epoch
            (``--teacher_epoch``; ``index_{i}/epoch_{E}.pt``, or ``checkpoint.pt`` when it holds
            exactly E epochs).
        archs: architectures of ``paths`` (``--teacher_arch``): one for every path, or one per
            path; ``timm:NAME``, ``torchvision:NAME`` or a bare torchvision name, or a
            ``networks.py`` name. Empty: every path is a ``train_original.py`` checkpoint file
            (``checkpoint.pt`` / ``epoch_{E}.pt``), which names its own architecture.
        paths: local weight files (``--teacher_path``), one network each.

    The networks are ``models`` x ``indices`` (model-major), then ``paths`` in order.
    """

    models: Tuple[str, ...] = ()
    directory: str = original_files.DEFAULT_SAVE_PATH
    indices: Tuple[int, ...] = (0,)
    epoch: Optional[int] = None
    archs: Tuple[str, ...] = ()
    paths: Tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("models", "archs", "paths"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        object.__setattr__(self, "directory", os.fspath(self.directory))

    def validate(self) -> None:
        """Check the combination of values; every message names the flag.

        Raises:
            utils.UserError: no network asked for, an unknown ``--teacher_model``, a negative
                index, an epoch below 1, ``--teacher_arch`` without ``--teacher_path`` or with a
                count that is neither 1 nor the number of paths.
        """
        if self.archs and not self.paths:
            raise utils.UserError(f"--teacher_arch {','.join(self.archs)} needs --teacher_path FILE: the weights come "
                                  "from a local file (nothing is downloaded)")
        if not self.models and not self.paths:
            raise utils.UserError("no teacher given: pass --teacher_model (train_original.py models) or "
                                  "--teacher_arch with --teacher_path (local weight files)")
        known = networks.list_networks()
        for model in self.models:
            if model not in known:
                raise utils.UserError(f"--teacher_model: unknown model {model!r}; choose from: {', '.join(known)}")
        if not self.indices or any(i < 0 for i in self.indices):
            raise utils.UserError(f"--teacher_index {','.join(map(str, self.indices))}: expected indices >= 0")
        if self.epoch is not None and int(self.epoch) < 1:
            raise utils.UserError(f"--teacher_epoch must be at least 1, got {self.epoch}")
        if len(self.archs) > 1 and len(self.archs) != len(self.paths):
            raise utils.UserError(f"--teacher_arch names {len(self.archs)} architectures for {len(self.paths)} "
                                  "--teacher_path files: give one for all, or one per file")

    def arch_paths(self) -> List[Tuple[Optional[str], str]]:
        """``(arch or None, path)`` for every ``--teacher_path`` file."""
        archs = list(self.archs) * len(self.paths) if len(self.archs) == 1 else list(self.archs) or [None] * len(
            self.paths)
        return list(zip(archs, self.paths))

    def as_dict(self) -> dict:
        """The JSON record: ``{'models', 'directory', 'indices', 'epoch', 'archs', 'paths'}`` (lists)."""
        record = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}

    @classmethod
    def from_dict(cls, record: Mapping) -> "TeacherSpec":
        """The spec of an :meth:`as_dict` record, or of a :attr:`Teacher.record` (its ``spec``).

        Raises:
            utils.UserError: the record is not such a dict, has unknown keys, or is a teacher
                record without a spec (networks handed over directly).
        """
        if isinstance(record, Mapping) and "networks" in record:
            if not isinstance(record.get("spec"), Mapping):
                raise utils.UserError("the recorded teacher was built from networks in memory, not from flags; "
                                      "give the teacher again with --teacher_model or --teacher_arch/--teacher_path")
            record = record["spec"]
        if not isinstance(record, Mapping):
            raise utils.UserError(f"a teacher record must be a dict, got {type(record).__name__}")
        unknown = sorted(set(record) - set(cls.__dataclass_fields__))
        if unknown:
            raise utils.UserError(f"teacher record has unknown field(s) {', '.join(unknown)}; it was written by a "
                                  "newer toolkit or edited")
        return cls(**record)

    def describe(self) -> str:
        """One line: ``ConvNetBN index 0,1 (epoch 5) in pretrained_model + resnet18 from r18.pth``."""
        parts = []
        for model in self.models:
            epoch = f" epoch {self.epoch}" if self.epoch is not None else ""
            parts.append(f"{model} index {','.join(map(str, self.indices))}{epoch} in {self.directory}")
        parts += [f"{arch or 'checkpoint'} from {path}" for arch, path in self.arch_paths()]
        return " + ".join(parts)


# --------------------------------------------------------------------------------------------
# The teacher module
# --------------------------------------------------------------------------------------------
class SelectClasses(nn.Module):
    """``net(x)[:, index]``: the logits of some classes of a wider classifier (an ImageNet-1K
    network on a 10-class ImageNet subset). ``index``: (K,) int64 class indices, label order."""

    def __init__(self, net: nn.Module, index: Sequence[int]):
        super().__init__()
        self.net = net
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K)."""
        return self.net(x).index_select(1, self.index)


def weights_sha256(net: nn.Module) -> str:
    """sha256 of a network's state_dict (names, dtypes, shapes and bytes, in order): the identity
    of a network handed over in memory (a file's identity is the sha256 of the file)."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Teacher(nn.Module):
    """Frozen networks in eval mode whose mean logits label images.

    ``forward(x)``: ``x`` (B, C, H, W) in the data's space (normalised or ZCA-whitened, as the
    networks were trained) -> (B, K) logits, the mean over :attr:`networks` (one network: its
    logits unchanged). Gradients flow to ``x`` (SRe2L optimises images through the teacher); the
    parameters never require gradients and ``train()`` keeps eval mode (BatchNorm uses its running
    statistics, as the references' ``model.eval()`` teachers do).

    Attributes:
        networks: ``nn.ModuleList`` of the networks.
        record: JSON-able ``{'spec': TeacherSpec.as_dict() or None, 'networks': [row, ...]}``, a
            row per network with ``arch``, ``source`` (the file, or None), ``sha256`` (of the
            file, or :func:`weights_sha256`), ``epoch``, ``test_acc`` (in [0, 1] or None),
            ``num_classes``, ``channel``, ``im_size``, ``zca``, ``index``, ``class_index``.

    Args:
        networks: one or more ``nn.Module`` mapping (B, C, H, W) to (B, K).
        record: the record (``load_teacher`` builds it); default: rows from the networks.

    Raises:
        ValueError: no network.
    """

    def __init__(self, networks: Sequence[nn.Module], record: Optional[Mapping] = None):
        super().__init__()
        networks = list(networks)
        if not networks:
            raise ValueError("Teacher: needs at least one network")
        self.networks = nn.ModuleList(networks)
        self.requires_grad_(False)
        super().train(False)
        if record is None:
            record = {"spec": None, "networks": [_memory_row(net) for net in networks]}
        self.record = dict(record)

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher stays in eval mode whatever ``mode`` (a parent's ``.train()`` included)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K): the mean of the networks' logits."""
        if len(self.networks) == 1:
            return self.networks[0](x)
        return torch.stack([net(x) for net in self.networks]).mean(0)

    def describe(self) -> str:
        """One line naming the networks and their sources."""
        rows = self.record.get("networks", [])
        return "; ".join(f"{row.get('arch')} from {row.get('source') or 'memory'}"
                         + (f" (epoch {row['epoch']})" if row.get("epoch") is not None else "")
                         + (f", test acc {100 * row['test_acc']:.2f}%" if row.get("test_acc") is not None else "")
                         for row in rows)


def _memory_row(net: nn.Module) -> dict:
    return {"arch": type(net).__name__, "source": None, "sha256": weights_sha256(net), "epoch": None,
            "test_acc": None, "num_classes": None, "channel": None, "im_size": None, "zca": None, "index": None,
            "class_index": None}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """What the data needs of a teacher."""

    dataset: str
    num_classes: int
    channel: int
    im_size: Tuple[int, int]
    zca: bool
    subset: Optional[str]
    name: str = field(default="")

    def shape(self) -> str:
        return f"{self.channel}x{self.im_size[0]}x{self.im_size[1]}"


def _checked(what: str, state: Mapping, target: _Target) -> None:
    """Refuse a train_original.py checkpoint that does not fit the data (one line each)."""
    classes = int(state["num_classes"])
    if classes != target.num_classes:
        raise utils.UserError(f"teacher {what} has {classes} classes but {target.name} has {target.num_classes}; "
                              f"use a teacher trained on {target.name}")
    channel, size = int(state["channel"]), tuple(int(s) for s in state["im_size"])
    if (channel, size) != (target.channel, target.im_size):
        raise utils.UserError(f"teacher {what} takes {channel}x{size[0]}x{size[1]} images but {target.name} gives "
                              f"{target.shape()} (check --res / --dataset)")
    zca = bool(state.get("config", {}).get("zca", False))
    if zca != target.zca:
        raise utils.UserError(f"teacher {what} was trained {'with' if zca else 'without'} --zca but the images here "
                              f"are {'ZCA-whitened' if target.zca else 'not whitened'}; use the same --zca setting")


def _row(arch: str, path: str, state: Mapping, target: _Target, index=None, class_index=None) -> dict:
    return {"arch": arch, "source": os.fspath(path), "sha256": file_sha256(path),
            "epoch": None if state.get("epochs_done") is None else int(state["epochs_done"]),
            "test_acc": state.get("test_acc"), "num_classes": int(state.get("num_classes", target.num_classes)),
            "channel": target.channel, "im_size": list(target.im_size), "zca": target.zca,
            "index": index, "class_index": None if class_index is None else [int(c) for c in class_index]}


def _network_from_checkpoint(path: str, state: Mapping, what: str) -> nn.Module:
    net = original_files.build_network(state["model"], state["channel"], state["num_classes"], state["im_size"],
                                       "cpu")
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise utils.UserError(f"teacher {what} does not fit networks.get_network({state['model']!r}): "
                              f"{' '.join(str(error).split())[:300]}") from None
    return net


def _load_original(spec: TeacherSpec, model: str, index: int, target: _Target) -> Tuple[nn.Module, dict]:
    """One ``train_original.py`` model of ``spec`` (finished, or after ``spec.epoch``)."""
    name = original_files.dataset_name(target.dataset, target.subset)
    final = original_files.checkpoint_path(spec.directory, target.dataset, model, index, target.subset)
    need = max(spec.indices) + 1
    if spec.epoch is None:
        if not os.path.isfile(final):
            raise utils.UserError(f"no teacher {model} {index} for {name}: {final} is missing; make it with: "
                                  f"{original_files.train_command(name, model, need, spec.directory, target.subset)}")
        path = final
    else:
        path = original_files.epoch_checkpoint_path(spec.directory, target.dataset, model, index, spec.epoch,
                                                    target.subset)
        if not os.path.isfile(path):
            if os.path.isfile(final) and int(original_files.read_checkpoint(final)["epochs_done"]) == spec.epoch:
                path = final
            else:
                command = original_files.train_command(name, model, need, spec.directory, target.subset,
                                                       epochs=spec.epoch, save_epochs=str(spec.epoch))
                raise utils.UserError(f"--teacher_epoch {spec.epoch}: {path} is missing; make it with: {command} "
                                      "(finished models are skipped: use a new --save_path/--teacher_dir)")
    state = original_files.read_checkpoint(path)
    if str(state.get("model")).lower() != model.lower() or str(state.get("dataset")).lower() != name.lower():
        raise utils.UserError(f"teacher {path} holds a {state.get('model')} trained on {state.get('dataset')}, not a "
                              f"{model} on {name}")
    if spec.epoch is None and not state.get("finished"):
        raise utils.UserError(f"teacher {path} is unfinished ({state['epochs_done']} of {state['epochs_total']} "
                              f"epochs); finish it with: "
                              f"{original_files.train_command(name, model, need, spec.directory, target.subset)}, "
                              f"or pass --teacher_epoch {state['epochs_done']}")
    _checked(path, state, target)
    return _network_from_checkpoint(path, state, path), _row(model, path, state, target, index=index)


def _state_dict_of(obj, path: str) -> dict:
    """The state_dict inside a loaded weight file (plain, or under a wrapper key; ``module.``
    and ``_orig_mod.`` prefixes of DDP / torch.compile removed)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(torch.is_tensor(v) for v in obj.values()):
            break
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(key),
                                                                                                    Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, Mapping) and obj and all(torch.is_tensor(v) for v in obj.values())):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise utils.UserError(f"--teacher_path {path} holds no state_dict (a dict of tensors, possibly under "
                              f"'{_WRAPPER_KEYS[0]}' or 'model'); found {keys}")
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _library(arch: str) -> Tuple[str, str]:
    """``(library, name)`` of a ``--teacher_arch`` value: timm, torchvision or networks."""
    if arch.startswith(TIMM_PREFIX):
        return "timm", arch[len(TIMM_PREFIX):]
    if arch.startswith(TORCHVISION_PREFIX):
        return "torchvision", arch[len(TORCHVISION_PREFIX):]
    if arch in networks.list_networks():
        return "networks", arch
    return "torchvision", arch


def _build(arch: str, num_classes: int, target: _Target) -> nn.Module:
    """A fresh ``arch`` network with ``num_classes`` outputs (the caller's RNG does not move).

    Raises:
        utils.UserError: an unknown architecture (the message says where names come from).
    """
    library, name = _library(arch)
    with torch.random.fork_rng(devices=[]):
        if library == "networks":
            return networks.get_network(name, target.channel, num_classes, target.im_size, device="cpu")
        if library == "timm":
            import timm

            if not timm.is_model(name):
                raise utils.UserError(f"--teacher_arch {arch}: timm has no model {name!r} (timm.list_models())")
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=target.channel)
        import torchvision

        if name not in torchvision.models.list_models():
            raise utils.UserError(f"--teacher_arch {arch}: not a torchvision model (torchvision.models.list_models()), "
                                  f"a timm model (timm:NAME) or a networks.py name ({', '.join(networks.list_networks())})")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _shape_problem(arch: str, path: str, net: nn.Module, weights: Mapping, target: _Target) -> Optional[int]:
    """Compare a file's tensors with a fresh network's. Returns the file's class count when only the
    classifier's output size differs, ``None`` when every shape fits.

    Raises:
        utils.UserError: missing or unexpected keys, another input channel count, or another
            classifier input size (another image size).
    """
    own = net.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    if missing or unexpected:
        raise utils.UserError(f"--teacher_path {path} does not fit --teacher_arch {arch}: "
                              f"{len(missing)} missing key(s) {', '.join(missing[:3])}; {len(unexpected)} "
                              f"unexpected key(s) {', '.join(unexpected[:3])}")
    first = next((key for key, value in own.items() if value.ndim == 4), None)
    if first is not None and weights[first].ndim == 4 and weights[first].shape[1] != target.channel:
        raise utils.UserError(f"teacher {path} takes {weights[first].shape[1]}-channel images but {target.name} has "
                              f"{target.channel} channel(s)")
    differ = [key for key in own if tuple(own[key].shape) != tuple(weights[key].shape)]
    if not differ:
        return None
    last = [key for key in own if own[key].ndim >= 1 and own[key].shape[0] == target.num_classes][-2:]
    heads = {int(weights[key].shape[0]) for key in differ}
    if set(differ) <= set(last) and len(heads) == 1:
        if all(tuple(weights[k].shape[1:]) == tuple(own[k].shape[1:]) for k in differ):
            return heads.pop()
        raise utils.UserError(f"teacher {path}: its classifier takes {tuple(weights[differ[0]].shape[1:])} features, "
                              f"{arch} on {target.shape()} images gives {tuple(own[differ[0]].shape[1:])}: it was "
                              f"trained on other image sizes (check --res)")
    key = differ[0]
    raise utils.UserError(f"--teacher_path {path} does not fit --teacher_arch {arch}: {key} has shape "
                          f"{tuple(weights[key].shape)}, the network {tuple(own[key].shape)}")


def _subset_classes(target: _Target) -> Optional[Tuple[int, ...]]:
    for name in (target.subset, target.dataset):
        if isinstance(name, str) and name.lower() in IMAGENET_SUBSETS:
            return IMAGENET_SUBSETS[name.lower()]
    return None


def _load_file(arch: Optional[str], path: str, target: _Target) -> Tuple[nn.Module, dict]:
    """One ``--teacher_path`` file with its ``--teacher_arch`` (or a train_original.py checkpoint)."""
    if not os.path.isfile(path):
        hint = ("save one with torch.save(model.state_dict(), FILE); nothing is downloaded" if arch else
                "train_original.py writes index_{i}/checkpoint.pt and, with --save_epochs, index_{i}/epoch_{E}.pt")
        raise utils.UserError(f"--teacher_path {path}: no such file ({hint})")
    try:
        obj = load_plain(path, "teacher file")
    except PlainDataError as error:  # unreadable, or a pickle that would run code
        raise utils.UserError(f"--teacher_path: {error}") from None
    if isinstance(obj, Mapping) and obj.get("format") == original_files.FORMAT:
        state = original_files.read_checkpoint(path)
        if arch is not None and _library(arch) != ("networks", state["model"]):
            raise utils.UserError(f"--teacher_path {path} is a train_original.py {state['model']} checkpoint, not "
                                  f"--teacher_arch {arch}; leave --teacher_arch out for it")
        _checked(path, state, target)
        return _network_from_checkpoint(path, state, path), _row(state["model"], path, state, target,
                                                                 index=state.get("index"))
    if arch is None:
        raise utils.UserError(f"--teacher_path {path} is a plain state_dict: name its architecture with "
                              "--teacher_arch (resnet18, timm:resnet18 or a networks.py name)")
    library, _ = _library(arch)
    if library != "networks" and target.zca:
        raise utils.UserError(f"--teacher_arch {arch}: a torchvision/timm teacher takes mean/std-normalised images, "
                              "but --zca whitens them; leave out --zca")
    weights = _state_dict_of(obj, path)
    net = _build(arch, target.num_classes, target)
    classes = _shape_problem(arch, path, net, weights, target)
    class_index = None
    if classes is not None:
        subset = _subset_classes(target)
        if classes == IMAGENET_CLASSES and subset is not None:
            class_index = subset
            net = _build(arch, classes, target)
        else:
            raise utils.UserError(f"teacher {path} has {classes} classes but {target.name} has {target.num_classes}; "
                                  f"use a teacher trained on {target.name}")
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise utils.UserError(f"--teacher_path {path} does not fit --teacher_arch {arch}: "
                              f"{' '.join(str(error).split())[:300]}") from None
    if class_index is not None:
        net = SelectClasses(net, class_index)
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, target.channel, *target.im_size))
    except RuntimeError as error:
        raise utils.UserError(f"teacher {arch} from {path} cannot take {target.shape()} images: "
                              f"{' '.join(str(error).split())[:200]}") from None
    if not torch.is_tensor(out) or tuple(out.shape) != (1, target.num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise utils.UserError(f"teacher {arch} from {path} returns {shape} for one image, not (1, {target.num_classes}) "
                              "logits")
    name = arch if library != "torchvision" or arch.startswith(TORCHVISION_PREFIX) else TORCHVISION_PREFIX + arch
    row = _row(name, path, {"num_classes": classes or target.num_classes}, target, class_index=class_index)
    return net, row


def load_teacher(spec: TeacherSpec, *, device, dataset: str, num_classes: int, channel: int,
                 im_size: Sequence[int], zca: bool = False, subset: Optional[str] = None) -> Teacher:
    """Load the networks ``spec`` names, check each against the data, and return the frozen teacher.

    Args:
        spec: the :class:`TeacherSpec`.
        device: where the teacher runs.
        dataset: the data's dataset name (``train_original.py`` models are looked up under it).
        num_classes: K, the classes the teacher must output.
        channel: C of the images the teacher gets.
        im_size: (H, W) of those images in pixels.
        zca: whether the images are ZCA-whitened (the teacher must have been trained so).
        subset: the ImageNet subset for ``dataset='ImageNet'``.

    Returns:
        A :class:`Teacher` on ``device``, eval mode, no parameter requiring gradients; its
        ``forward`` maps (B, C, H, W) to (B, K) mean logits.

    Raises:
        utils.UserError: one line for: an invalid spec (see :meth:`TeacherSpec.validate`); a
            missing file (for ``train_original.py`` models: with the command that makes it); a
            file that would run code when loaded, or unreadable; an unfinished model without
            ``--teacher_epoch``; another class count, channel count, image size or ZCA setting
            than the data's; weights that do not fit the architecture; an unknown architecture.
    """
    spec.validate()
    size = tuple(int(s) for s in im_size)
    target = _Target(dataset=str(dataset), num_classes=int(num_classes), channel=int(channel), im_size=size,
                     zca=bool(zca), subset=subset, name=original_files.dataset_name(dataset, subset))
    nets, rows = [], []
    for model in spec.models:
        for index in spec.indices:
            net, row = _load_original(spec, model, index, target)
            nets.append(net)
            rows.append(row)
    for arch, path in spec.arch_paths():
        net, row = _load_file(arch, path, target)
        nets.append(net)
        rows.append(row)
    teacher = Teacher(nets, record={"spec": spec.as_dict(), "networks": rows}).to(torch.device(device))
    logger.info("teacher: %s", teacher.describe())
    return teacher


def check_same_teacher(record: Mapping, teacher: Teacher) -> None:
    """Refuse to replay with a teacher other than the recorded one (a set's ``meta['teacher']``).

    Compares the networks' count, order and sha256 (of the files, or of in-memory weights).

    Args:
        record: a :attr:`Teacher.record` as saved (``{'spec', 'networks'}``).
        teacher: the teacher loaded now.

    Raises:
        utils.UserError: one line naming the first network that differs (or the counts).
        ValueError: ``record`` has no ``networks`` list.
    """
    saved = record.get("networks") if isinstance(record, Mapping) else None
    if not isinstance(saved, list):
        raise ValueError("check_same_teacher: the record has no 'networks' list (a Teacher.record is needed)")
    now = teacher.record.get("networks", [])
    if len(saved) != len(now):
        raise utils.UserError(f"the teacher has {len(now)} network(s) but the recorded one had {len(saved)} "
                              f"({'; '.join(str(r.get('source') or r.get('arch')) for r in saved)})")
    for position, (old, new) in enumerate(zip(saved, now)):
        if old.get("sha256") != new.get("sha256"):
            raise utils.UserError(
                f"teacher network {position} ({new.get('arch')} from {new.get('source') or 'memory'}, sha256 "
                f"{str(new.get('sha256'))[:12]}) differs from the recorded one ({old.get('arch')} from "
                f"{old.get('source') or 'memory'}, sha256 {str(old.get('sha256'))[:12]}); give the recorded teacher")
