"""Generated miniature datasets shared by the tests (imported as ``from tiny_data import ...``)."""
import torch

from data import DatasetRecord

PROTOTYPE_SEED = 99


def tiny_record(num_classes=3, per_class=24, size=8, seed=0, name="Tiny3") -> DatasetRecord:
    """A separable dataset of 1 x size x size images: class prototype * 1.5 + N(0, 0.5^2) noise.

    ``per_class`` training and ``per_class // 2`` test images per class, class-major; the
    prototypes depend only on ``PROTOTYPE_SEED``, the noise on ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 1, size, size, generator=torch.Generator().manual_seed(PROTOTYPE_SEED))

    def make(n):
        labels = torch.arange(num_classes).repeat_interleave(n)
        return 1.5 * prototypes[labels] + 0.5 * torch.randn(len(labels), 1, size, size, generator=g), labels

    (train_x, train_y), (test_x, test_y) = make(per_class), make(per_class // 2)
    return DatasetRecord(name=name, channel=1, im_size=(size, size), num_classes=num_classes,
                         class_names=[str(c) for c in range(num_classes)], mean=[0.0], std=[1.0],
                         images_train=train_x, labels_train=train_y, images_test=test_x, labels_test=test_y)
