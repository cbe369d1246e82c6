"""NCFM: neural characteristic function matching.

Source: Wang et al., "Dataset Distillation with Neural Characteristic Function: A Minmax Perspective",
CVPR 2025; reference gszfwsb/NCFM (``NCFM/NCFM.py`` the loss, ``NCFM/SampleNet.py`` the sampling
network, ``condenser/Condenser.py`` and ``condenser/compute_loss.py`` the loop, ``condenser/decode.py``
the multi-formation decoder, ``utils/utils.py`` ``update_feature_extractor`` the network pool,
``condenser/evaluate.py`` the evaluation, defaults from ``config/ipc10/cifar10.yaml``).

Loss (per class, features f of a network's ``embed``, L2-normalised per image; frequencies
t_1..t_F ~ N(0, I), ``--num_freqs`` 4096 of them, or from the sampling network):

    phi(t) = mean_i cos(t . f_i) + i mean_i sin(t . f_i)           (empirical characteristic function)
    amp(t) = (|phi_real(t)| - |phi_syn(t)|)^2
    pha(t) = max(2 (|phi_real| |phi_syn| - Re_real Re_syn - Im_real Im_syn), 1e-12)
    L      = 300 * mean_t sqrt(alpha * amp(t) + beta * pha(t))    (alpha = beta = 0.5)

An iteration: a network of the pool is drawn (``index ~ U{0..num_premodel-1}``), its weights set to
``l * initial + (1 - l) * trained`` with ``l ~ U(0, 1)``; then for every class in turn one AdamW step
on that class's loss, where the synthetic images are the class's stored images decoded into
``factor²`` images each (:func:`evaluation.formation.decode_zoom`) and the real batch is
``batch_real`` images of the class, both through one shared DiffAugment draw of every operation of
``--aug_type``; then ``iter_calib`` rounds of one step per class on ``calib_weight *
CE(trained(aug(decoded)), y)``. Before each iteration the pixels are clipped to the valid range; the
image learning rate halves when the iteration's loss has not improved for 500 iterations
(``ReduceLROnPlateau``). The first iteration's images are ``mix``: each stored image a grid of
``factor²`` real images, each shrunk (nearest) into its cell.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import utils
from evaluation.formation import decode_zoom, mix_grid
from methods.base import DistillConfig, DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.options import MethodOptions, option
from pretrained import original_files

NCFM_LOSS = "gszfwsb/NCFM NCFM/NCFM.py"
NCFM_CONFIG = "gszfwsb/NCFM config/ipc10/cifar10.yaml"
NCFM_SCRIPT = "gszfwsb/NCFM condense/condense_script.py"
# The loss scale of match_loss (NCFM/NCFM.py: ``300 * args.cf_loss_func(...)``).
CF_SCALE = 300.0
# The sampling network's frequencies: t_batchsize 64 (SampleNet's default, the one condense_script.py
# uses) from t_batchsize // 16 noise rows, each output repeated 16 times.
SAMPLING_FREQS = 64
SAMPLING_ROWS = SAMPLING_FREQS // 16
# The weight decay of the images' AdamW and of the sampling network's SGD (train.weight_decay).
WEIGHT_DECAY = 5e-4
# ReduceLROnPlateau of the images (Condenser.condense): factor 0.5, patience 500, mode min.
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 500


# --------------------------------------------------------------------------------------------
# The loss (pure functions)
# --------------------------------------------------------------------------------------------
def characteristic_function(features: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The empirical characteristic function of ``features`` at frequencies ``t``.

    Args:
        features: (B, D).
        t: (F, D) frequencies.

    Returns:
        ``(real, imag)``, each (F,): ``mean_i cos(t . f_i)`` and ``mean_i sin(t . f_i)``
        (``calculate_real`` / ``calculate_imag`` of ``NCFM/NCFM.py``).
    """
    arg = t @ features.t()
    return torch.cos(arg).mean(dim=1), torch.sin(arg).mean(dim=1)


def cf_loss(feat_real: torch.Tensor, feat_syn: torch.Tensor, t: torch.Tensor, alpha: float = 0.5,
            beta: float = 0.5) -> torch.Tensor:
    """NCFM's characteristic-function distance (``CFLossFunc.forward`` of ``NCFM/NCFM.py``):
    ``mean_t sqrt(alpha (|phi_r| - |phi_s|)^2 + beta max(2 (|phi_r||phi_s| - Re_r Re_s - Im_r Im_s), 1e-12))``.

    Args:
        feat_real: (B1, D) target (real) features; feat_syn: (B2, D) synthetic features.
        t: (F, D) frequencies.
        alpha, beta: weights of the amplitude and phase terms (``--alpha_for_loss``, ``--beta_for_loss``).

    Returns:
        A scalar tensor (graph to both feature tensors and ``t``).
    """
    re_s, im_s = characteristic_function(feat_syn, t)
    re_r, im_r = characteristic_function(feat_real, t)
    norm_s = torch.sqrt(re_s * re_s + im_s * im_s)
    norm_r = torch.sqrt(re_r * re_r + im_r * im_r)
    amplitude = (norm_r - norm_s) ** 2
    phase = (2 * (norm_r * norm_s - re_s * re_r - im_s * im_r)).clamp(min=1e-12)
    return torch.sqrt(alpha * amplitude + beta * phase).mean()


def ncfm_match_loss(feat_real: torch.Tensor, feat_syn: torch.Tensor, t: torch.Tensor, alpha: float = 0.5,
                    beta: float = 0.5) -> torch.Tensor:
    """``300 * cf_loss`` of the L2-normalised features (``match_loss`` of ``NCFM/NCFM.py``).

    Args:
        feat_real: (B1, D) real features (no gradient needed); feat_syn: (B2, D); t: (F, D).

    Returns:
        A scalar tensor.
    """
    return CF_SCALE * cf_loss(F.normalize(feat_real, dim=1), F.normalize(feat_syn, dim=1), t, alpha, beta)


# --------------------------------------------------------------------------------------------
# Multi-formation initialisation and augmentation
# --------------------------------------------------------------------------------------------
def batch_augment(x: torch.Tensor, aug_type: str, generator: torch.Generator) -> torch.Tensor:
    """IDC's ``DiffAug(strategy, batch=True)`` as NCFM's matching uses it: one parameter draw shared
    by the whole batch for each of ``flip`` and ``color`` (when named), then one of the other
    operations drawn uniformly, then ``cutout`` (when named); each operation is this toolkit's DSA
    operation (``augment.sample_diffaug_params`` with ``siamese=True``).

    Args:
        x: (N, C, H, W); aug_type: ``--aug_type``, e.g. ``color_crop_cutout``; generator: CPU generator.

    Returns:
        (N, C, H, W), differentiable in ``x``.
    """
    ops = augment.validate_strategy(aug_type)
    middle = [op for op in ops if op not in ("flip", "color", "cutout")]
    chosen = [op for op in ("flip", "color") if op in ops]
    if middle:
        chosen.append(middle[int(torch.randint(len(middle), (1,), generator=generator))] if len(middle) > 1
                      else middle[0])
    if "cutout" in ops:
        chosen.append("cutout")
    for op in chosen:
        x = augment.apply_diffaug(x, augment.sample_diffaug_params(op, x.shape[0], tuple(x.shape[2:]), generator, True))
    return x


class SamplingNet(nn.Module):
    """NCFM's sampling network (``SampleNet`` of ``NCFM/SampleNet.py``): three ``Linear(D, D)`` +
    ``BatchNorm1d(D)`` layers with LeakyReLU(0.2), LeakyReLU(0.2), Tanh, fed
    :data:`SAMPLING_ROWS` rows of N(0, 1) noise; the output rows repeated to :data:`SAMPLING_FREQS`
    frequencies. Trained to maximise the matching loss (minmax).

    Args:
        dim: D, the feature width.
    """

    def __init__(self, dim: int):
        super().__init__()
        layers: List[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2) if i < 2 else nn.Tanh()]
        self.layers = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """(SAMPLING_ROWS, D) noise -> (SAMPLING_FREQS, D) frequencies."""
        return self.layers(noise).repeat(SAMPLING_FREQS // noise.shape[0], 1)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NCFMOptions(MethodOptions):
    """NCFM's own flags, with the reference's names and defaults (``config/ipc10/cifar10.yaml``)."""

    num_freqs: int = option(4096, "NCFM: frequencies t ~ N(0, I) drawn per class step", minimum=1, source=NCFM_CONFIG)
    alpha_for_loss: float = option(0.5, "NCFM: weight of the amplitude term", minimum=0.0, source=NCFM_CONFIG)
    beta_for_loss: float = option(0.5, "NCFM: weight of the phase term", minimum=0.0, source=NCFM_CONFIG)
    factor: int = option(2, "factor x factor images per stored image (NCFM: multi-formation, decoded for matching "
                            "and evaluation; RDED: patches stitched)", minimum=1, source=NCFM_CONFIG)
    num_premodel: int = option(20, "NCFM: train_original.py models in the pool (indices 0..N-1)", minimum=1,
                               source=NCFM_CONFIG)
    pretrain_dir: str = option(original_files.DEFAULT_SAVE_PATH, "NCFM: root of the pool (train_original.py "
                               "--save_path)", source=NCFM_CONFIG)
    iter_calib: int = option(1, "NCFM: calibration rounds per iteration (one CE step per class each)", minimum=0,
                             source=NCFM_CONFIG)
    calib_weight: float = option(1.0, "NCFM: weight of the calibration cross-entropy", minimum=0.0,
                                 source=NCFM_CONFIG)
    lr_scale_adam: float = option(0.1, "NCFM: the images' AdamW lr is --lr_img x this", minimum=0.0,
                                  exclusive_minimum=True, source="gszfwsb/NCFM utils/init_script.py")
    aug_type: str = option("color_crop_cutout", "NCFM: augmentation of the matching (IDC DiffAug, one draw per "
                                                "batch, every operation)", source=NCFM_SCRIPT)
    sampling_net: bool = option(False, "NCFM: learn the frequencies with the sampling network (minmax)",
                                source=NCFM_CONFIG)
    lr_sampling_net: float = option(1e-3, "NCFM: SGD lr of the sampling network", minimum=0.0,
                                    exclusive_minimum=True, source=NCFM_CONFIG)


@register_method("NCFM")
class NCFM(DistillMethod):
    """Neural characteristic function matching (module docstring) against a pool of
    ``train_original.py`` models, on multi-formation images."""

    reference_model_source = NCFM_CONFIG + " (net_type ConvNet: depth 3, instance norm)"
    defaults = dict(ipc=10, iterations=20000, lr_img=0.01, batch_real=1024, batch_train=128, init="mix",
                    dsa_strategy="color_crop_flip_scale_rotate", eval_mode="S")
    init_choices = ("mix", "real", "noise")
    unused_flags = ("dis_metric", "outer_loop", "inner_loop")
    options_type = NCFMOptions
    options: NCFMOptions
    # Each class step updates the images, so add-on terms and a sharded loss do not apply.
    addon_hooks = frozenset()
    loss_functions = ("class_loss", "calibration_loss")
    needs_pretrained = True
    # condenser/evaluate.py: 2000 epochs; evaluation_script.py --val_repeat 10.
    eval_epochs = (2000, 2000)
    run_counts = (1, 10)
    # condenser/evaluate.py with the yaml's train/augmentation keys: AdamW(adamw_lr 1e-3, torch's
    # weight decay 0.01), MultiStepLR x0.5 at each fifth, DSA without cutout, CutMix (beta 1) with p 0.5.
    eval_student_defaults = {"optimizer": "adamw", "adamw_schedule": "multistep", "mix_type": "cutmix",
                             "mix_p": 0.5}

    @classmethod
    def student_defaults(cls, cfg: DistillConfig):
        """:attr:`eval_student_defaults` and ``decode_factor`` = ``--factor``: the stored images are
        decoded before training, as the reference's ``get_syndataLoader``."""
        options = cls.resolve_options(cfg.extra)
        return {**cls.eval_student_defaults, "decode_factor": options.factor}

    @classmethod
    def check_files(cls, cfg: DistillConfig) -> None:
        """The pool's directory holds models ``0 .. num_premodel - 1`` of ``--model`` (checked before
        any data is loaded).

        Raises:
            utils.UserError: one line naming the directory and the ``train_original.py`` command.
        """
        options = cls.resolve_options(cfg.extra)
        directory = original_files.original_dir(options.pretrain_dir, cfg.dataset, cfg.model, cfg.subset)
        found = original_files.list_indices(directory) if os.path.isdir(directory) else []
        missing = [i for i in range(options.num_premodel) if i not in found]
        if missing:
            command = original_files.train_command(original_files.dataset_name(cfg.dataset, cfg.subset), cfg.model,
                                                   options.num_premodel, options.pretrain_dir, cfg.subset)
            raise utils.UserError(f"--method NCFM --num_premodel {options.num_premodel}: {directory} lacks models "
                                  f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}; make "
                                  f"them with: {command} (or lower --num_premodel, or give --pretrain_dir)")

    def __init__(self, cfg: DistillConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self._pool: Optional[List[Tuple[nn.Module, nn.Module]]] = None
        self.matcher: Optional[nn.Module] = None
        self.pixel_range: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.ReduceLROnPlateau] = None
        self.sampler_net: Optional[SamplingNet] = None
        self.optimizer_sampling: Optional[torch.optim.Optimizer] = None

    # ---- the pool ---------------------------------------------------------------------------
    @property
    def pool(self) -> List[Tuple[nn.Module, nn.Module]]:
        """``[(initial, trained), ...]``: ``num_premodel`` pairs of networks of ``--model`` (frozen),
        loaded on first use from ``--pretrain_dir`` (:meth:`load_pool`); tests may assign one.

        Raises:
            utils.UserError: a model is missing or does not fit the data.
        """
        if self._pool is None:
            self._pool = self.load_pool()
        return self._pool

    @pool.setter
    def pool(self, value: List[Tuple[nn.Module, nn.Module]]) -> None:
        self._pool = list(value)

    def load_pool(self) -> List[Tuple[nn.Module, nn.Module]]:
        """The trained models ``0 .. num_premodel - 1`` of ``--model`` on this dataset
        (``original_files.load_pool``, checked against the run's image shape, classes and ZCA) and
        the networks they started from (``original_files.load_initial_models``)."""
        o = self.options
        expect = {"channel": self.channel, "num_classes": self.num_classes,
                  "im_size": [int(s) for s in self.im_size], "zca": bool(self.cfg.zca)}
        trained = original_files.load_pool(o.pretrain_dir, self.cfg.dataset, [self.cfg.model], o.num_premodel,
                                           self.device, subset=self.cfg.subset, expect=expect)[self.cfg.model]
        initial = original_files.load_initial_models(o.pretrain_dir, self.cfg.dataset, self.cfg.model,
                                                     o.num_premodel, self.device, subset=self.cfg.subset)
        return list(zip(initial, trained))

    def draw_networks(self) -> Tuple[nn.Module, nn.Module]:
        """``(matcher, trained)`` of this iteration (``update_feature_extractor``): a pool index and
        ``l ~ U(0, 1)`` from the generator; the matcher's parameters ``l initial + (1 - l) trained``.
        Both in train mode (as the reference's), frozen."""
        index = int(torch.randint(len(self.pool), (1,), generator=self.generator))
        lam = float(torch.rand((), generator=self.generator))
        initial, trained = self.pool[index]
        if self.matcher is None:
            self.matcher = self.new_network().requires_grad_(False)
        with torch.no_grad():
            for target, a, b in zip(self.matcher.parameters(), initial.parameters(), trained.parameters()):
                target.copy_(lam * a + (1 - lam) * b)
            for target, b in zip(self.matcher.buffers(), trained.buffers()):
                target.copy_(b)
        return self.matcher.train(), trained.train()

    # ---- set-up -----------------------------------------------------------------------------
    def init_synthetic(self) -> SyntheticSet:
        """``--init mix`` (each stored image a grid of ``factor²`` real images of its class,
        :func:`mix_grid`), ``real`` or ``noise``; records the valid pixel range (per channel, the
        range of the real training images) for the clip before every iteration.

        Raises:
            utils.UserError: ``--init mix`` and a class with fewer than ``ipc factor²`` real images.
        """
        real = self.sampler.images.transpose(0, 1).reshape(self.channel, -1)
        shape = (1, self.channel, 1, 1)
        self.pixel_range = (real.min(dim=1).values.view(shape), real.max(dim=1).values.view(shape))
        if self.cfg.init != "mix":
            return super().init_synthetic()
        factor, ipc = self.options.factor, self.cfg.ipc
        need = ipc * factor * factor
        fewest = min(range(self.num_classes), key=lambda c: self.sampler.class_counts[c])
        if self.sampler.class_counts[fewest] < need:
            raise utils.UserError(f"--init mix: --ipc {ipc} with --factor {factor} needs {need} real images per class "
                                  f"(ipc x factor²), class {fewest} has {self.sampler.class_counts[fewest]}; "
                                  f"lower --ipc or --factor, or use --init real")
        images = torch.cat([mix_grid(self.sampler.get_images(c, need, self.generator), factor, ipc)
                            for c in range(self.num_classes)])
        syn = SyntheticSet(images.to(self.device), SyntheticSet.class_major_labels(self.num_classes, ipc,
                                                                                   device=self.device),
                           self.num_classes, ipc)
        self.configure(syn)
        return syn

    def configure(self, syn: SyntheticSet) -> None:
        """AdamW(lr_img x lr_scale_adam, weight decay 5e-4) on the images with ReduceLROnPlateau
        (x0.5, patience 500); with ``--sampling_net``, the sampling network (its width from the
        pool's features) and its SGD(lr_sampling_net, momentum 0.5, weight decay 5e-4)."""
        o = self.options
        self.optimizer_img = torch.optim.AdamW([syn.images], lr=self.cfg.lr_img * o.lr_scale_adam,
                                               weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer_img, mode="min",
                                                                    factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
        if o.sampling_net:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=self.generator)))
                self.sampler_net = SamplingNet(self.pool[0][1].embed_dim).to(self.device)
            self.optimizer_sampling = torch.optim.SGD(self.sampler_net.parameters(), lr=o.lr_sampling_net,
                                                      momentum=0.5, weight_decay=WEIGHT_DECAY)

    # ---- one iteration ----------------------------------------------------------------------
    def decoded(self, syn: SyntheticSet, c: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class ``c``'s stored images decoded: ``(ipc factor², C, H, W)`` images and their labels."""
        return decode_zoom(syn.class_images(c), syn.labels[c * syn.ipc:(c + 1) * syn.ipc], self.options.factor)

    def frequencies(self, dim: int) -> torch.Tensor:
        """(F, D) frequencies: ``num_freqs`` rows of N(0, I) from the generator, or the sampling
        network's :data:`SAMPLING_FREQS` rows."""
        if self.sampler_net is not None:
            noise = torch.randn(SAMPLING_ROWS, dim, generator=self.generator).to(self.device)
            return self.sampler_net(noise)
        return torch.randn(self.options.num_freqs, dim, generator=self.generator).to(self.device)

    def class_loss(self, syn: SyntheticSet, c: int, net: nn.Module) -> torch.Tensor:
        """Class ``c``'s matching loss under ``net`` (:func:`ncfm_match_loss`): ``batch_real`` real
        images and the decoded synthetic images through one :func:`batch_augment` draw."""
        real = self.sampler.get_images(c, self.cfg.batch_real, self.generator)
        images, _ = self.decoded(syn, c)
        both = batch_augment(torch.cat([real, images]), self.options.aug_type, self.generator)
        with torch.no_grad():
            feat_real = net.embed(both[:real.shape[0]])
        feat_syn = net.embed(both[real.shape[0]:])
        t = self.frequencies(feat_syn.shape[1])
        return ncfm_match_loss(feat_real.float(), feat_syn.float(), t.float(), self.options.alpha_for_loss,
                               self.options.beta_for_loss)

    def calibration_loss(self, syn: SyntheticSet, c: int, trained: nn.Module) -> torch.Tensor:
        """``calib_weight * CE(trained(aug(decoded_c)), c)`` (``cailb_loss`` of ``NCFM/NCFM.py``)."""
        images, labels = self.decoded(syn, c)
        logits = trained(batch_augment(images, self.options.aug_type, self.generator))
        return self.options.calib_weight * F.cross_entropy(logits.float(), labels)

    def step(self, syn: SyntheticSet, iteration: int) -> Dict[str, torch.Tensor]:
        """One iteration (module docstring): clip, draw the networks, one step per class on its
        matching loss (and, with the sampling network, one ascent step of that network), ``iter_calib``
        rounds of one step per class on the calibration loss, then the plateau scheduler on the
        iteration's loss.

        Returns:
            ``{'loss', 'loss_match', 'loss_calib'}``: per-class means (detached), ``loss`` their sum.
        """
        with torch.no_grad():
            syn.images.data = torch.maximum(torch.minimum(syn.images.data, self.pixel_range[1]), self.pixel_range[0])
        net, trained = self.draw_networks()
        match = torch.zeros((), device=self.device)
        for c in range(self.num_classes):
            with self.precision.autocast(self.device):
                loss = self.class_loss(syn, c, net)
            if self.sampler_net is None:
                self.update_images(syn, loss)
            else:  # compute_match_loss: descend on the images, then ascend on the sampling network
                self.optimizer_img.zero_grad(set_to_none=True)
                self.optimizer_sampling.zero_grad(set_to_none=True)
                loss.backward(retain_graph=True)
                self.optimizer_img.step()
                self.optimizer_img.zero_grad(set_to_none=True)
                (-loss).backward()
                self.optimizer_sampling.step()
                self.optimizer_sampling.zero_grad(set_to_none=True)
            match += loss.detach()
        calib = torch.zeros((), device=self.device)
        for _ in range(self.options.iter_calib):
            for c in range(self.num_classes):
                with self.precision.autocast(self.device):
                    loss = self.calibration_loss(syn, c, trained)
                self.update_images(syn, loss)
                calib += loss.detach()
        total = (match + calib) / self.num_classes
        self.scheduler.step(float(total))
        return {"loss": total, "loss_match": match / self.num_classes, "loss_calib": calib / self.num_classes}

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The images' optimiser, the plateau scheduler and the sampling network with its optimiser."""
        state = super().state_dict()
        state["scheduler"] = self.scheduler.state_dict() if self.scheduler is not None else None
        if self.sampler_net is not None:
            state["sampling_net"] = self.sampler_net.state_dict()
            state["optimizer_sampling"] = self.optimizer_sampling.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after :meth:`init_synthetic`)."""
        super().load_state_dict(state)
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler_net is not None and state.get("sampling_net") is not None:
            self.sampler_net.load_state_dict(state["sampling_net"])
            self.optimizer_sampling.load_state_dict(state["optimizer_sampling"])
