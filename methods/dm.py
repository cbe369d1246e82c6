"""DM: distribution matching of mean embeddings under random networks.

Source: Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023 (eq. 4);
reference ``main_DM.py`` of VICO-UoE/DatasetCondensation (docs/reference-notes.md, *DC, DSA and DM*).
"""
from __future__ import annotations

import torch

import chunked
from methods.base import DistillMethod, SyntheticSet
from methods.registry import register_method
from methods.losses import class_means, mean_embedding_distance

@register_method("DM")
class DM(DistillMethod):
    """Per iteration: a fresh random network with frozen weights (train mode) embeds
    ``batch_real`` real images and the synthetic images of every class, each class pair under
    one siamese DiffAugment draw; the loss is ``sum_c ||mean E(real_c) - mean E(S_c)||^2`` and
    one SGD step updates the images. There is no inner loop.

    All classes are forwarded in one batch: for a BatchNorm network this is the reference's
    joint forward (batch statistics span every class); for the others every sample is computed
    independently, so it equals the reference's per-class loop while using larger batches.

    Under torchrun each rank computes the terms of its classes (``shards_classes``; not for a
    BatchNorm network, whose joint statistics span every class).
    """

    reference_model_source = "VICO-UoE/DatasetCondensation main_DM.py (--model ConvNet)"
    defaults = dict(ipc=50, iterations=20000, lr_img=1.0, lr_net=0.01, batch_real=256, batch_train=256,
                    init="real", dsa_strategy="color_crop_cutout_flip_scale_rotate", eval_mode="SS")
    unused_flags = ("dis_metric", "outer_loop", "inner_loop")
    shards_classes = True

    def new_network(self):
        """A fresh random ``cfg.model`` in train mode with every parameter frozen (DM never trains it)."""
        net = super().new_network()
        net.train()
        for param in net.parameters():
            param.requires_grad_(False)
        return net

    def loss(self, syn: SyntheticSet) -> torch.Tensor:
        """DM eq. 4: ``sum_c ||mean_i E(real_c,i) - mean_j E(S_c,j)||^2`` under one fresh network.

        Returns:
            A scalar tensor with a graph to ``syn.images``.
        """
        net = self.new_network()
        classes = self.owned_classes()  # None: every class (one process)
        real, label_real, image_syn, label_syn = self.sample_batches(syn, classes)
        if classes is not None and not classes:  # more ranks than classes: nothing here
            return syn.images.new_zeros(())
        embed_real = chunked.embed_in_chunks(net, real)  # one pass for BatchNorm nets (joint statistics)
        mean_real = class_means(embed_real, label_real, self.num_classes)
        mean_syn = class_means(net.embed(image_syn), label_syn, self.num_classes)
        return mean_embedding_distance(mean_real, mean_syn)
