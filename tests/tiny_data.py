"""Generated miniature datasets and builders shared by the tests (imported as ``from tiny_data import ...``).

Plain functions only; the pytest fixtures built on them (``pretrained``, ``buffer_root``) live in
``conftest.py``. No test module imports another test module.
"""
import torch

from data import DatasetRecord

PROTOTYPE_SEED = 99
CPU = torch.device("cpu")
MTT_MODEL = "ConvNetW32"


def tiny_record(num_classes=3, per_class=24, size=8, seed=0, name="Tiny3", channel=1,
                separable=True) -> DatasetRecord:
    """A dataset of channel x size x size images: class prototype * 1.5 + N(0, 0.5^2) noise.

    ``per_class`` training and ``per_class // 2`` test images per class, class-major; the
    prototypes depend only on ``PROTOTYPE_SEED``, the noise on ``seed``. ``separable=False``
    leaves the prototypes out (pure noise, classes not learnable).
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, channel, size, size, generator=torch.Generator().manual_seed(PROTOTYPE_SEED))

    def make(n):
        labels = torch.arange(num_classes).repeat_interleave(n)
        noise = 0.5 * torch.randn(len(labels), channel, size, size, generator=g)
        return (1.5 * prototypes[labels] + noise if separable else noise), labels

    (train_x, train_y), (test_x, test_y) = make(per_class), make(per_class // 2)
    return DatasetRecord(name=name, channel=channel, im_size=(size, size), num_classes=num_classes,
                         class_names=[str(c) for c in range(num_classes)], mean=[0.0] * channel, std=[1.0] * channel,
                         images_train=train_x, labels_train=train_y, images_test=test_x, labels_test=test_y, zca=None)


def build_method(method, record, precision=None, **overrides):
    """A distillation method on ``record`` (CPU): the method's defaults with ipc 2, batch_real 16,
    batch_train 8, 3 iterations and ConvNetW32, then ``overrides`` (keys that are not
    ``DistillConfig`` fields go to ``extra``); torch and the method's generator seeded with 0;
    ``precision`` a ``precision.Precision`` (default float32)."""
    import methods
    import utils
    from data import RealSampler

    cls = methods.get_method_class(method)
    fields = {**cls.defaults, "ipc": 2, "batch_real": 16, "batch_train": 8, "iterations": 3, **overrides}
    fields["iterations"] = fields.pop("iterations")
    fields.pop("eval_mode", None)
    known = methods.DistillConfig.__dataclass_fields__
    extra = {key: fields.pop(key) for key in list(fields) if key not in known}
    fields.setdefault("model", "ConvNetW32")
    cfg = methods.DistillConfig(method=method, dataset=record.name, extra=extra, **fields)
    torch.manual_seed(0)
    g = utils.make_generator(0)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    kwargs = {} if precision is None else {"precision": precision}
    return with_addons(cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                           sampler=sampler, device=CPU, generator=g, **kwargs), record)


def make_tiny_buffer(root) -> str:
    """2 experts x 4 epochs of ConvNetW32 on ``tiny_record()`` (3 classes, 8x8), written under
    ``root`` in buffer.py's layout; returns ``str(root)`` (the ``buffer_path``)."""
    from pretrained import buffers, experts

    record = tiny_record()
    cfg = experts.ExpertConfig(dataset=record.name, model=MTT_MODEL, train_epochs=4, batch_train=8, dsa=False,
                               lr_teacher=0.05)
    directory = buffers.buffer_dir(str(root), record.name, MTT_MODEL, False)
    experts.make_buffer(cfg, record, directory, 2, device=CPU, test_every=0)
    return str(root)


def build_mtt(method, buffer_root, precision=None, **overrides):
    """A trajectory-matching method (MTT, DATM, PAD) on ``tiny_record()`` reading the buffer under
    ``buffer_root``: ipc 2, ConvNetW32, lr_img 100, 4 iterations, syn_steps 4, expert_epochs 1,
    max_start_epoch 3, then ``overrides``; ``precision`` as :func:`build_method`; returns
    ``(method, record)``."""
    import methods
    import utils
    from data import RealSampler

    record = tiny_record()
    cls = methods.get_method_class(method)
    fields = {k: v for k, v in cls.defaults.items() if k != "eval_mode"}
    fields.update(ipc=2, model=MTT_MODEL, lr_img=100.0, iterations=4)
    extra = dict(buffer_path=buffer_root, syn_steps=4, expert_epochs=1, max_start_epoch=3)
    for key, value in overrides.items():
        (fields if key in methods.DistillConfig.__dataclass_fields__ else extra)[key] = value
    cfg = methods.DistillConfig(method=method, dataset=record.name, extra=extra, **fields)
    torch.manual_seed(0)
    sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, CPU)
    kwargs = {} if precision is None else {"precision": precision}
    return with_addons(cls(cfg, channel=record.channel, num_classes=record.num_classes, im_size=record.im_size,
                           sampler=sampler, device=CPU, generator=utils.make_generator(0), **kwargs), record), record


def with_addons(method, record):
    """``method`` with the add-ons its configuration turns on attached, as the runner does."""
    from methods import addons

    method.attach_addons(addons.create(method.cfg, method, addons.load_shared(method.cfg, record, CPU)))
    return method


def image_loss_addon(fn):
    """An add-on whose only hook is ``image_loss = fn(syn)`` (for tests of the image-update hook)."""
    from methods.addons.base import AddOn

    class ImageLoss(AddOn):
        name = "test_image_loss"

        def image_loss(self, syn):
            return fn(syn)

    return ImageLoss(None, None)
