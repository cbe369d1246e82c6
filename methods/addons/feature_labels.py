"""Learning privileged feature labels F beside the synthetic images (DRUPI, ``--feature_labels``).

Source: "Dataset Reduction Using Privileged Information" (DRUPI, arXiv 2410.01611), repository
turturturturtur/DRUPI ``DC/main.py`` (docs/reference-notes.md, *DRUPI*). The synthetic set becomes
(x, y, F). A method keeps updating x with its own loss; after every image update the
:class:`FeatureLabels` add-on updates F with the feature step of ``DC/main.py`` on a network:

    for every class c (one real batch per class, shared by the K = n_feat sets):
        g_r = grad_{theta \\ classifier} CE(f(x_r), c)
        for every set k:
            l_s = CE(f(S_c), c) + lbd * D(E(S_c), F_{k,c})          (S_c detached)
            g_s = grad_{theta \\ classifier} l_s                      (create_graph)
            L  += dist(g_s, g_r) + feat_lbd * CE(h(F_{k,c}), c)
    one optimiser step on F (SGD(lr_feat, momentum 0.5), or Adam for any other --feat_opt)

``h`` runs F through the same network's remaining layers and classifier
(``feature_loss.classify_features``); the reference's fresh random Linear layer is not used.
It is an add-on (``methods/addons/base.py``): DC/DSA call its step
(``after_image_update``) with their network of the outer loop (BatchNorm frozen as for the image
step) and train that network on CE + lbd * D(E(x), F) (``training_term``); methods without a
network of their own (DM and the other feature-statistics methods, through
``DistillMethod.step``) call it with a fresh random network each iteration. The
trajectory-matching methods learn F inside their unroll instead (``unroll_loss``; DRUPI
``DATM_FD/distill/DATM_ours.py``). It needs a method that trains networks on the set with its
term and learns F after image updates or in an unroll (:attr:`FeatureLabels.requires`): CAFE, DD,
KIP, FRePo and the coreset baselines do not host it.

The add-on declares its flags (:meth:`FeatureLabels.add_args`; DRUPI ``DC/main.py`` names and
defaults, the reference's dashed spellings as aliases) and ``evaluate.py``'s ``--lbd``; its
settings (:class:`FeatureLabelConfig`) are recorded under ``feature_labels``; F is the third
entry of each saved ``data`` item, as DRUPI saves it (:meth:`FeatureLabels.saved_term` reads it back).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
import chunked
import evaluation
from flag_types import Range, non_negative_float, positive_float, positive_int
from methods.addons import register_addon
from methods.addons.base import AFTER_IMAGE_UPDATE, TRAINING_TERM, UNROLL_LOSS, AddOn
from methods.addons.feature_loss import (FeatureLossConfig, FeatureTargets, classify_features, feature_distance,
                                         forward_with_features, pool_features)
from methods.addons.feature_loss import select_feature_set as select_feature_set_train
from methods.losses import gradient_match_distance

FEATURE_INITS = ("pretrained", "random", "noise")
FEATURE_PER = ("image", "class")
# Methods whose reference DRUPI code defaults --feat_lbd to 0.02 (DATM_FD/distill/DATM_ours.py).
FEAT_LBD_002 = ("MTT", "DATM", "PAD")


@dataclass(frozen=True)
class FeatureLabelConfig:
    """The ``--feature_labels`` flags (DRUPI ``DC/main.py`` names and defaults).

    Attributes:
        lbd, layer_idx, pooling, feat_metric, feat_norm, use_feature: the training loss
            (see ``feature_loss.FeatureLossConfig``).
        lr_feat: learning rate of F (0.1).
        feat_opt: ``SGD`` (momentum 0.5); any other value means Adam, as in the reference.
        feat_lbd: weight of CE(h(F), y) (0 in DC; 0.02 in DATM_ours).
        n_feat: K, the number of sets of feature labels (1).
        feat_per: ``image`` (one F per synthetic image, default) or ``class`` (one per class).
        feat_init: ``pretrained`` (reference: F = E(S) under a network trained one epoch on the
            real training set), ``random`` (E(S) under a fresh network) or ``noise`` (N(0, 1)).

    Raises:
        ValueError: a value outside its range (the message names the flag).
    """

    lbd: float = 0.01
    lr_feat: float = 0.1
    feat_opt: str = "SGD"
    layer_idx: Optional[int] = None
    pooling: Optional[str] = None
    feat_lbd: float = 0.0
    n_feat: int = 1
    use_feature: str = "mean"
    feat_metric: str = "mse"
    feat_norm: bool = False
    feat_per: str = "image"
    feat_init: str = "pretrained"

    def __post_init__(self):
        self.loss_config()  # validates the loss fields
        if not self.lr_feat > 0:
            raise ValueError(f"--lr_feat must be positive, got {self.lr_feat}")
        if self.feat_lbd < 0:
            raise ValueError(f"--feat_lbd must be >= 0, got {self.feat_lbd}")
        if self.n_feat < 1:
            raise ValueError(f"--n_feat must be at least 1, got {self.n_feat}")
        if self.feat_per not in FEATURE_PER:
            raise ValueError(f"--feat_per {self.feat_per!r}: expected image or class")
        if self.feat_init not in FEATURE_INITS:
            raise ValueError(f"--feat_init {self.feat_init!r}: expected one of {', '.join(FEATURE_INITS)}")

    def loss_config(self) -> FeatureLossConfig:
        """The settings networks trained on (x, y, F) use."""
        return FeatureLossConfig(lbd=self.lbd, layer_idx=self.layer_idx, pooling=self.pooling,
                                 metric=self.feat_metric, norm=self.feat_norm, use_feature=self.use_feature)


class _Tap(nn.Module):
    """Wraps a network so that ``torch.func.functional_call`` can run :func:`forward_with_features`
    (``mode='tap'``) or :func:`classify_features` (``mode='classify'``) under given parameters."""

    def __init__(self, net: nn.Module, cfg: FeatureLabelConfig):
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(self, x: torch.Tensor, mode: str = "tap", tap_size=None):
        if mode == "tap":
            return forward_with_features(self.net, x, self.cfg.layer_idx)
        return classify_features(self.net, x, self.cfg.layer_idx, tap_size, self.cfg.pooling)


# --layer_idx: a ConvNet block from 1 (feature_loss.FeatureLossConfig), or none for the last feature map.
LAYER_INDEX = Range(int, 1, none_word="none")


def _optional_str(value: str) -> Optional[str]:
    """``None`` for none/None, else the lower-cased string (``--pooling``)."""
    return None if value.strip().lower() == "none" else value.strip().lower()


@register_addon
class FeatureLabels(AddOn):
    """The feature-label add-on: initialises, optimises and serves the feature labels of one
    synthetic set (module docstring).

    Args:
        settings: the flags (:class:`FeatureLabelConfig`).
        method: the distillation method (its sampler, device, generator, model and lr_net are used).
        shared: unused.
    """

    name = "feature_labels"
    title = "feature labels"
    flag = "--feature_labels"
    record_key = "feature_labels"
    hooks = frozenset({AFTER_IMAGE_UPDATE, TRAINING_TERM, UNROLL_LOSS})
    # Networks trained on the set must use its term, and F must be learned: after every image
    # update (DC's feature step) or inside a trajectory-matching unroll (DATM_ours).
    requires = (frozenset({AFTER_IMAGE_UPDATE, TRAINING_TERM}), frozenset({UNROLL_LOSS, TRAINING_TERM}))
    saved_name = "features"

    # ---- settings ----------------------------------------------------------------------
    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """``--feature_labels`` and its settings (``distill.py``; DRUPI ``DC/main.py`` names and defaults)."""
        group = parser.add_argument_group("privileged feature labels (DRUPI)")
        group.add_argument("--feature_labels", action=argparse.BooleanOptionalAction, default=False,
                           help="learn a feature label F per image (or class) beside the images; networks trained on "
                                "the set minimise CE + lbd * D(E(x), F)")
        group.add_argument("--lbd", type=non_negative_float, default=0.01, help="lambda of D(E(x), F) in network training (0.01)")
        group.add_argument("--lr_feat", "--lr-feat", dest="lr_feat", type=positive_float, default=0.1,
                           help="learning rate of F (0.1)")
        group.add_argument("--feat_opt", "--feat-opt", dest="feat_opt", default="SGD",
                           help="optimiser of F: SGD (momentum 0.5) or anything else for Adam (SGD)")
        group.add_argument("--layer_idx", "--layer-idx", dest="layer_idx", type=LAYER_INDEX, default=None,
                           help="feature tap: omitted/none = last feature map, k = after ConvNet block k's pool")
        group.add_argument("--pooling", type=_optional_str, default=None,
                           help="avg, max or sum: pool E(x) and F to 1x1 (default none)")
        group.add_argument("--feat_lbd", "--feat-lbd", dest="feat_lbd", type=non_negative_float, default=None,
                           help="weight of CE(h(F), y) in the feature step (0; MTT/DATM/PAD 0.02)")
        group.add_argument("--n_feat", "--n-feat", dest="n_feat", type=positive_int, default=1,
                           help="number of sets of feature labels (1)")
        group.add_argument("--use_feature", "--use-feature", dest="use_feature", default="mean",
                           help="with --n_feat > 1: mean (average the sets) or random (one set per batch)")
        group.add_argument("--feat_metric", "--feat-metric", dest="feat_metric", type=str.lower, default="mse",
                           help="D: mse, cos (1 - cosine) or mmd (Gaussian kernel)")
        group.add_argument("--feat_norm", "--feat-norm", dest="feat_norm", action=argparse.BooleanOptionalAction,
                           default=False, help="L2-normalise E(x) and F along the channel axis")
        group.add_argument("--feat_per", default="image",
                           help="image (one F per synthetic image) or class (one per class)")
        group.add_argument("--feat_init", default="pretrained",
                           help="pretrained (E(S) under a network trained one epoch on the real set, as the "
                                "reference), random (a fresh network) or noise (N(0, 1))")

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> Optional[FeatureLabelConfig]:
        """The :class:`FeatureLabelConfig` of the parsed flags, or ``None`` without ``--feature_labels``;
        ``--feat_lbd`` left out is 0.02 for MTT/DATM/PAD (DRUPI ``DATM_ours.py``), else 0.

        Raises:
            ValueError: a value out of range (the message names the flag).
        """
        if not values["feature_labels"]:
            return None
        feat_lbd = values["feat_lbd"]
        if feat_lbd is None:
            feat_lbd = 0.02 if values["method"] in FEAT_LBD_002 else 0.0
        names = [f.name for f in dataclasses.fields(FeatureLabelConfig) if f.name != "feat_lbd"]
        return FeatureLabelConfig(feat_lbd=feat_lbd, **{name: values[name] for name in names})

    @classmethod
    def results_record(cls, settings: FeatureLabelConfig) -> dict:
        """The loss settings networks trained on the set use (``feature_loss.FeatureLossConfig``)."""
        return dataclasses.asdict(settings.loss_config())

    @classmethod
    def legacy_state(cls, state: Mapping[str, Any]) -> Optional[dict]:
        """Checkpoints written before the add-on interface kept F's optimiser as ``state['feature_labels']``."""
        return state.get("feature_labels")

    # ---- evaluating a saved set --------------------------------------------------------
    @classmethod
    def add_eval_args(cls, parser: argparse.ArgumentParser) -> None:
        """``evaluate.py --lbd``."""
        parser.add_argument("--lbd", type=non_negative_float, default=None,
                            help="sets saved with feature labels F (DRUPI): lambda of D(E(x), F) in training (default: "
                                 "the value the set was distilled with, else 0.01); 0 trains with CE only")

    @classmethod
    def check_eval_flags(cls, values: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` for a negative ``--lbd``."""
        if values.get("lbd") is not None and values["lbd"] < 0:
            raise ValueError(f"--lbd must be >= 0, got {values['lbd']}")

    @classmethod
    def saved_term(cls, entry, record, num_images: int, num_classes: int, values: Mapping[str, Any]):
        """:func:`load_term` of the saved F (the extra entry of a ``data`` item, as DRUPI saves it;
        ``sets.saved`` reads DRUPI's files and this toolkit's older ones so) with the saved
        settings and ``--lbd``."""
        return load_term(entry, record or {}, num_images, num_classes, values.get("lbd"))

    def __init__(self, settings: FeatureLabelConfig, method, shared=None):
        super().__init__(settings, method, shared)
        self.cfg = settings
        self.loss_cfg = settings.loss_config()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._step_losses: list = []  # feature-step losses since the last pop_logs
        self._unroll_ce: list = []  # per-unroll sums of CE(h(F_b), y_b) (trajectory matching)

    # ---- set-up -------------------------------------------------------------------------
    def new_network(self) -> nn.Module:
        """A fresh trainable ``--model`` network on the method's device (global torch RNG)."""
        m = self.method
        return networks.get_network(m.cfg.model, m.channel, m.num_classes, m.im_size, device=m.device)

    def pretrained_network(self) -> nn.Module:
        """A fresh network trained for ONE epoch on the whole real training set (SGD(lr_net), no
        momentum, batch_train, no augmentation), as the reference ``DC/main.py`` initialises F."""
        m = self.method
        net = self.new_network()
        optimizer = torch.optim.SGD(net.parameters(), lr=m.cfg.lr_net)
        evaluation.train_epoch(net, m.sampler.images, m.sampler.labels, optimizer, m.cfg.batch_train, m.generator)
        return net

    def initial_features(self, syn) -> torch.Tensor:
        """(n_feat, N or K, ...) initial F: each set from its own network (``pretrained`` /
        ``random``), E(S) pooled per ``--pooling`` (class means with ``--feat_per class``), or
        N(0, 1) of that shape (``noise``)."""
        sets = []
        for _ in range(self.cfg.n_feat):
            net = self.pretrained_network() if self.cfg.feat_init == "pretrained" else self.new_network()
            net.eval()
            with torch.no_grad():
                parts = [forward_with_features(net, x, self.cfg.layer_idx)[1] for x in syn.images.detach().split(256)]
            features = pool_features(torch.cat(parts), self.cfg.pooling)
            if self.cfg.feat_per == "class":
                features = features.reshape(syn.num_classes, syn.ipc, *features.shape[1:]).mean(dim=1)
            if self.cfg.feat_init == "noise":
                features = torch.randn(features.shape, generator=self.method.generator).to(features.device)
            sets.append(features)
        return torch.stack(sets)

    def attach(self, syn) -> None:
        """Give ``syn`` learnable feature labels and create their optimiser."""
        features = self.initial_features(syn)
        if features.dim() < 3 or features.shape[1] not in (syn.images.shape[0], syn.num_classes):
            raise ValueError(f"feature labels must be (n_feat, {syn.images.shape[0]} or {syn.num_classes}, ...), "
                             f"got {tuple(features.shape)}")
        features = syn.learn_extra("features", features)
        if self.cfg.feat_opt.upper() == "SGD":
            self.optimizer = torch.optim.SGD([features], lr=self.cfg.lr_feat, momentum=0.5)
        else:
            self.optimizer = torch.optim.Adam([features], lr=self.cfg.lr_feat)

    def targets(self, syn) -> FeatureTargets:
        """The current F of ``syn`` (detached) for training a network on (x, y, F)."""
        return FeatureTargets(syn.features.detach(), syn.images.shape[0], syn.num_classes, self.loss_cfg)

    def training_term(self, syn) -> Optional[FeatureTargets]:
        """Networks trained on the set minimise CE + lbd * D(E(x), F); ``None`` when ``lbd`` is 0
        (plain cross-entropy, the same objective)."""
        return self.targets(syn) if self.loss_cfg.lbd > 0 else None

    def after_image_update(self, syn, net: Optional[nn.Module] = None) -> None:
        """One :meth:`feature_step` on ``net`` (a fresh random network if ``None``)."""
        self._step_losses.append(self.feature_step(syn, net))

    def unroll_loss(self, student, params, syn, index, images, targets):
        """:meth:`unroll_step_loss`; the extra term is ``feat_lbd * CE(h(F_b), y_b)``."""
        loss, ce_feat = self.unroll_step_loss(student, params, syn, index, images, targets)
        self._unroll_ce.append(ce_feat.detach())
        return loss, self.cfg.feat_lbd * ce_feat

    def optimizers(self) -> list:
        """F's optimiser."""
        return [self.optimizer] if self.optimizer is not None else []

    def pop_logs(self) -> dict:
        """``feat_loss`` (mean feature-step loss) and ``feat_ce`` (summed CE(h(F_b), y_b) of the
        unrolls) since the last call, where there were any."""
        logs = {}
        if self._step_losses:
            logs["feat_loss"] = torch.stack(self._step_losses).mean()
        if self._unroll_ce:
            logs["feat_ce"] = torch.stack(self._unroll_ce).sum()
        self._step_losses, self._unroll_ce = [], []
        return logs

    # ---- the feature step ---------------------------------------------------------------
    def class_features(self, syn, c: int) -> torch.Tensor:
        """(n_feat, ipc, ...) the feature labels of class ``c``'s images (graph to ``syn.features``)."""
        if self.cfg.feat_per == "class":
            return syn.features[:, c:c + 1].expand(-1, syn.ipc, *syn.features.shape[2:])
        return syn.features[:, c * syn.ipc:(c + 1) * syn.ipc]

    def feature_loss(self, syn, net: nn.Module) -> torch.Tensor:
        """The matching loss of F on ``net`` (module docstring; the feature step of DRUPI ``DC/main.py``).

        Returns:
            A scalar with a graph to ``syn.features`` only.
        """
        m = self.method
        params = [p for name, p in net.named_parameters() if p.requires_grad and not name.startswith("classifier.")]
        if not params:
            raise ValueError(f"--feature_labels: {m.cfg.model} has no trainable parameters before its classifier")
        loss = torch.zeros((), device=m.device)
        for c in range(m.num_classes):
            real = m.sampler.get_images(c, m.cfg.batch_real, m.generator)
            label_real = torch.full((real.shape[0],), c, dtype=torch.long, device=m.device)
            grad_real = chunked.param_grads(net, params, real, label_real)
            image_syn = syn.class_images(c).detach()
            label_syn = torch.full((image_syn.shape[0],), c, dtype=torch.long, device=m.device)
            logits, features = forward_with_features(net, image_syn, self.cfg.layer_idx)
            ce = F.cross_entropy(logits, label_syn)
            tap_size = tuple(features.shape[2:]) if features.dim() == 4 else None
            for labels_k in self.class_features(syn, c):
                distance = feature_distance(features, labels_k, self.cfg.feat_metric, self.cfg.feat_norm,
                                            self.cfg.pooling)
                grad_syn = torch.autograd.grad(ce + self.cfg.lbd * distance, params, create_graph=True)
                loss = loss + gradient_match_distance(grad_syn, grad_real, m.cfg.dis_metric)
                if self.cfg.feat_lbd > 0:
                    logits_f = classify_features(net, labels_k, self.cfg.layer_idx, tap_size, self.cfg.pooling)
                    loss = loss + self.cfg.feat_lbd * F.cross_entropy(logits_f, label_syn)
        return loss

    def feature_step(self, syn, net: Optional[nn.Module] = None) -> torch.Tensor:
        """Update F once: :meth:`feature_loss` on ``net`` (a fresh random network if ``None``),
        backward (into ``syn.features`` only; the network's gradients are left alone), step.

        Returns:
            The loss (detached scalar).
        """
        net = net if net is not None else self.new_network()
        loss = self.feature_loss(syn, net)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[syn.features])
        self.optimizer.step()
        return loss.detach()

    # ---- trajectory matching (DRUPI DATM_FD/distill/DATM_ours.py) -----------------------
    def unroll_step_loss(self, student, params: torch.Tensor, syn, index: torch.Tensor, images: torch.Tensor,
                         targets: torch.Tensor) -> tuple:
        """One student step of DATM_ours: CE(f(x; theta_n), y_b) + lbd * D(E(x; theta_n), F_b), and
        CE(h(F_b; theta_n), y_b) for the feature term, with ``theta_n`` the flat parameters.

        F_b keeps its graph to ``syn.features`` (the trajectory loss reaches F through the unroll);
        h(F_b) uses ``theta_n`` detached, so the CE of F trains F only. The reference pools both
        sides with a fixed AvgPool(4); here ``--pooling`` is used as in DC.

        Args:
            student: the method's ``mtt.FlatModel``.
            params: (P,) flat parameters theta_n.
            index: (B,) positions of the batch in the set; images: (B, C, H, W) (maybe augmented).
            targets: (B,) int64 or (B, K) probabilities.

        Returns:
            ``(step loss, feature CE)``, scalars.
        """
        tap = _Tap(student.net, self.cfg)
        pieces = params.split(student.numels)
        named = {f"net.{name}": p.view(shape) for name, p, shape in zip(student.names, pieces, student.shapes)}
        logits, features = torch.func.functional_call(tap, named, (images,))
        rows = torch.div(index, syn.ipc, rounding_mode="floor") if self.cfg.feat_per == "class" else index
        batch = select_feature_set_train(syn.features[:, rows], self.cfg.use_feature, self.method.generator)
        distance = feature_distance(features, batch, self.cfg.feat_metric, self.cfg.feat_norm, self.cfg.pooling)
        loss = F.cross_entropy(logits, targets) + self.cfg.lbd * distance
        ce_feat = torch.zeros((), device=params.device)
        if self.cfg.feat_lbd > 0:
            detached = {name: p.detach() for name, p in named.items()}
            tap_size = tuple(features.shape[2:]) if features.dim() == 4 else None
            logits_f = torch.func.functional_call(tap, detached, (batch,), {"mode": "classify", "tap_size": tap_size})
            ce_feat = F.cross_entropy(logits_f, targets)
        return loss, ce_feat

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimiser of F."""
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def load_term(raw: torch.Tensor, settings: dict, num_images: int, num_classes: int,
              lbd: Optional[float] = None) -> Optional[FeatureTargets]:
    """The training term of a saved set's feature labels (``evaluate.py``; the raw entry and
    settings come from ``sets.saved.SavedSet``): F (the extra entry of a result file's ``data``
    item, as DRUPI saves it) with the loss settings saved with the set (``meta.config.feature_labels``),
    ``lbd`` overriding lambda. A file without them (DRUPI's own) takes DRUPI's defaults, with avg
    pooling when F is 1x1.

    Args:
        raw: (n_feat, N or K, ...) feature labels.
        settings: the saved ``FeatureLabelConfig`` fields (``{}`` if none).
        num_images, num_classes: N and K of the set.
        lbd: ``--lbd``; ``None`` takes the saved value (default 0.01).

    Returns:
        The ``FeatureTargets``, or ``None`` when lambda is 0 (plain cross-entropy).

    Raises:
        ValueError: ``lbd`` is negative, a saved setting is invalid, or F's shape does not fit the set.
    """
    if lbd is not None and lbd < 0:
        raise ValueError(f"--lbd must be >= 0, got {lbd}")
    features, saved = raw.float(), settings
    pooling = saved.get("pooling", "avg" if features.dim() == 5 and tuple(features.shape[3:]) == (1, 1) else None)
    cfg = FeatureLossConfig(lbd=lbd if lbd is not None else saved.get("lbd", 0.01), layer_idx=saved.get("layer_idx"),
                            pooling=pooling, metric=saved.get("feat_metric", "mse"), norm=saved.get("feat_norm", False),
                            use_feature=saved.get("use_feature", "mean"))
    targets = FeatureTargets(features, num_images, num_classes, cfg)  # checks the shape
    return targets if cfg.lbd > 0 else None
