"""DataDAM: dataset distillation by attention matching.

Source: Sajedi et al., "DataDAM: Efficient Dataset Distillation with Attention Matching", ICCV
2023 (eq. 1-3); reference ``main_DataDAM.py`` of DataDistillation/DataDAM.

Paper and code disagree (docs/reference-notes.md, *DataDAM*): the paper's table uses attention
power p = 4 and an InstanceNorm ConvNet, the released code p = 1 and a BatchNorm ConvNet. The
defaults follow the paper (``--attention_power 4``, ``--model ConvNet``);
``--attention_power 1 --model ConvNetBN`` gives the code's setting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import SyntheticSet
from methods.registry import register_method
from methods.options import MethodOptions, option
from methods.dm import DM
from methods.features import real_class_statistics, syn_class_statistics
from methods.losses import attention_matching_loss, class_means, spatial_attention


DATADAM_REFERENCE = "DataDistillation/DataDAM main_DataDAM.py"


@dataclass(frozen=True)
class DataDAMOptions(MethodOptions):
    """DataDAM's own flags: ``task_balance`` from ``main_DataDAM.py``; the attention power from the
    paper's hyperparameter table (the released code uses 1)."""

    task_balance: float = option(0.01, "DataDAM: weight of the last-layer MMD term", minimum=0.0,
                                 source=DATADAM_REFERENCE)
    attention_power: float = option(4.0, "DataDAM: p in sum_c |A|^p (paper 4; released code 1)", minimum=0.0,
                                    exclusive_minimum=True, source="DataDistillation/DataDAM img/HPTable.png (paper)")


@register_method("DataDAM")
class DataDAM(DM):
    """Per iteration: a fresh frozen network (train mode) embeds ``batch_real`` real images and
    the synthetic images of every class (siamese DiffAugment per class, as DM); the loss matches
    the class-mean spatial attention of every intermediate stage but the last, plus the
    class-mean last-layer embedding weighted by ``task_balance``. One SGD step on the images.
    """

    reference_model_source = "DataDistillation/DataDAM main_DataDAM.py (--model ConvNet)"
    defaults = dict(ipc=50, iterations=20000, lr_img=1.0, lr_net=0.01, batch_real=64, batch_train=64,
                    init="real", dsa_strategy="color_crop_cutout_flip_scale_rotate", eval_mode="SS")
    run_counts = (1, 10)  # main_DataDAM.py: --num_exp 1 --num_eval 10
    options_type = DataDAMOptions
    options: DataDAMOptions

    # 1800 epochs, as ``main_DataDAM.py``.
    eval_epochs = (1800, 1800)

    def _attention(self, maps):
        """Spatial attention of every stage but the last (the reference hooks all ReLUs and drops the last)."""
        return [spatial_attention(m, self.options.attention_power) for m in maps[:-1]]

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """DataDAM eq. 3 under one fresh network (see :func:`methods.losses.attention_matching_loss`)."""
        net = self.new_network()
        classes = self.owned_classes()  # None: every class (one process); else this rank's (torchrun)
        real, label_real, image_syn, label_syn = self.sample_batches(syn, classes)
        if classes is not None and not classes:  # more ranks than classes: nothing here
            return syn.images.new_zeros(())
        att_real, embed_real = real_class_statistics(net, real, label_real, self.num_classes, self._attention)
        att_syn, mean_syn = syn_class_statistics(net, image_syn, label_syn, self.num_classes, self._attention)
        mean_real = class_means(embed_real, label_real, self.num_classes)
        return attention_matching_loss(att_real, att_syn, mean_real, mean_syn, self.options.task_balance)
