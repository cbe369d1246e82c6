"""Tests for the data package: registry, loaders on generated miniatures, ZCA and the real sampler.

All fixtures are generated in tmp_path; the only real data is Debian's Fashion-MNIST, used when
/usr/share/datasets/fashion-mnist exists. No network.
"""
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (DATASETS, IMAGENET_SUBSETS, DatasetError, DatasetRecord, RawSplits, RealSampler,
                  ZCA, list_datasets, load_dataset, register_dataset, sample_random_real)

FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep decompressed files out of the user's cache."""
    monkeypatch.setenv('DD_CACHE', str(tmp_path / 'cache'))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


# --------------------------------------------------------------------------------------------------
# registry and errors
# --------------------------------------------------------------------------------------------------

def test_registry_has_every_dataset():
    expected = {'MNIST', 'FashionMNIST', 'SVHN', 'CIFAR10', 'CIFAR100', 'TinyImageNet', 'Tiny', 'MHIST',
                'ImageNet', *IMAGENET_SUBSETS}
    assert expected == set(list_datasets()) == set(DATASETS)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError) as info:
        load_dataset('NotADataset')
    message = str(info.value)
    assert 'NotADataset' in message and 'CIFAR10' in message and 'imagenette' in message
    assert '\n' not in message


def test_register_duplicate_raises():
    with pytest.raises(ValueError):
        register_dataset('cifar10')(lambda *a, **k: None)


def test_missing_cifar10_names_the_path(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset('CIFAR10', str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and 'cifar-10-batches-py' in message and '\n' not in message


def test_missing_svhn_and_mnist_name_the_path(tmp_path):
    for name, expected in (('SVHN', 'train_32x32.mat'), ('MNIST', 'train-images-idx3-ubyte')):
        with pytest.raises(DatasetError) as info:
            load_dataset(name, str(tmp_path))
        assert str(tmp_path) in str(info.value) and expected in str(info.value)


def test_bad_res_and_subset(tmp_path):
    with pytest.raises(DatasetError, match='res'):
        load_dataset('CIFAR10', str(tmp_path), res=64)
    with pytest.raises(DatasetError, match='res'):
        load_dataset('imagenette', str(tmp_path), res=0)
    with pytest.raises(DatasetError, match='subset'):
        load_dataset('MNIST', str(tmp_path), subset='imagenette')
    with pytest.raises(DatasetError, match='imagewoof'):
        load_dataset('ImageNet', str(tmp_path), subset='imagecats')


# --------------------------------------------------------------------------------------------------
# FashionMNIST: search order and the real files
# --------------------------------------------------------------------------------------------------

def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str, packed: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {f'{prefix}-images-idx3-ubyte': struct.pack('>IIII', 0x803, *images.shape) + images.tobytes(),
             f'{prefix}-labels-idx1-ubyte': struct.pack('>II', 0x801, len(labels)) + labels.tobytes()}
    for name, blob in blobs.items():
        if packed:
            (folder / f'{name}.gz').write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def _write_fake_mnist(folder: Path, packed: bool, train_count: int = 20) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (('train', train_count), ('t10k', 10)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        _write_idx(folder, images, labels, prefix, packed)


def test_fashion_mnist_search_order(tmp_path):
    raw_root, gz_root = tmp_path / 'raw_layout', tmp_path / 'gz_layout'
    _write_fake_mnist(raw_root / 'FashionMNIST' / 'raw', packed=False, train_count=20)
    _write_fake_mnist(gz_root, packed=True, train_count=30)
    assert load_dataset('FashionMNIST', str(raw_root)).images_train.shape == (20, 1, 28, 28)
    record = load_dataset('FashionMNIST', str(gz_root))
    assert record.images_train.shape == (30, 1, 28, 28) and record.images_test.shape == (10, 1, 28, 28)
    assert record.labels_train.dtype == torch.int64 and record.class_names[0] == 'T-shirt/top'
    cached = list((tmp_path / 'cache').rglob('train-images-idx3-ubyte'))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    load_dataset('FashionMNIST', str(gz_root))
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(data.torchvision_sets, 'FASHION_MNIST_SYSTEM_DIR', str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetError) as info:
        load_dataset('FashionMNIST', str(tmp_path / 'empty'))
    assert str(tmp_path / 'empty') in str(info.value) and 'nowhere' in str(info.value)


@pytest.mark.integration
@pytest.mark.skipif(not FASHION_DIR.is_dir() and not os.environ.get('CI'),
                    reason='Debian dataset-fashion-mnist not installed (CI installs it and never skips this)')
def test_fashion_mnist_real_no_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data_path 'data' does not exist here
    record = load_dataset('FashionMNIST')
    assert record.images_train.shape == (60000, 1, 28, 28)
    assert record.images_test.shape == (10000, 1, 28, 28)
    assert record.images_train.dtype == torch.float32
    assert set(record.labels_train.unique().tolist()) == set(range(10)) == set(record.labels_test.tolist())
    assert abs(record.images_train.mean().item()) < 0.05
    assert abs(record.images_train.std().item() - 1.0) < 0.05
    assert record.num_classes == 10 and len(record.class_names) == 10
    pixels = record.denormalize(record.images_test[:8])
    assert pixels.min() >= 0 and pixels.max() <= 1


# --------------------------------------------------------------------------------------------------
# TinyImageNet, both layouts
# --------------------------------------------------------------------------------------------------

def _write_tiny_pt(folder: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    content = {
        'classes': ['n001', 'n002', 'n003'],
        'images_train': torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=generator),
        'labels_train': torch.arange(12) % 3,
        'images_val': torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=generator),
        'labels_val': torch.arange(6) % 3,
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(content, folder / 'tinyimagenet.pt')
    return content


def _write_tiny_folders(folder: Path) -> None:
    rng = np.random.default_rng(1)
    for label, wnid in enumerate(('n01', 'n02', 'n03')):
        for k in range(2):
            _png(folder / 'train' / wnid / 'images' / f'{wnid}_{k}.png',
                 np.full((64, 64, 3), 40 * label + 10, dtype=np.uint8))
        _png(folder / 'val' / 'images' / wnid / f'val_{label}.png',
             rng.integers(0, 256, size=(64, 64, 3)))


def test_tiny_imagenet_pt(tmp_path):
    content = _write_tiny_pt(tmp_path)
    record = load_dataset('TinyImageNet', str(tmp_path))
    assert record.images_train.shape == (12, 3, 64, 64) and record.images_test.shape == (6, 3, 64, 64)
    assert record.class_names == content['classes'] and record.num_classes == 3
    assert torch.allclose(record.denormalize(record.images_train), content['images_train'] / 255.0, atol=1e-5)
    assert torch.equal(record.labels_test, content['labels_val'])


def test_tiny_imagenet_folders_and_alias(tmp_path):
    _write_tiny_folders(tmp_path)
    record = load_dataset('Tiny', str(tmp_path))
    assert record.name == 'Tiny' and record.class_names == ['n01', 'n02', 'n03']
    assert record.images_train.shape == (6, 3, 64, 64) and record.images_test.shape == (3, 3, 64, 64)
    assert record.labels_train.tolist() == [0, 0, 1, 1, 2, 2]
    pixels = record.denormalize(record.images_train)
    for label in range(3):
        expected = (40 * label + 10) / 255.0
        assert torch.allclose(pixels[record.labels_train == label], torch.tensor(expected), atol=1e-5)


def test_tiny_imagenet_prefers_pt_and_reports_both_layouts(tmp_path):
    _write_tiny_folders(tmp_path)
    _write_tiny_pt(tmp_path)
    assert load_dataset('TinyImageNet', str(tmp_path)).images_train.shape[0] == 12
    with pytest.raises(DatasetError) as info:
        load_dataset('TinyImageNet', str(tmp_path / 'missing'))
    assert 'tinyimagenet.pt' in str(info.value) and 'val/images' in str(info.value)


# --------------------------------------------------------------------------------------------------
# ImageNet subsets
# --------------------------------------------------------------------------------------------------

def _write_imagenet(folder: Path, subset: str) -> list[str]:
    """1000 fake wnid folders in train/ (sorted order = class index); images only in the subset's."""
    wnids = [f'n{index:08d}' for index in range(1000)]
    for wnid in wnids:
        (folder / 'train' / wnid).mkdir(parents=True)
    rng = np.random.default_rng(2)
    for label, index in enumerate(IMAGENET_SUBSETS[subset]):
        colour = 20 * label + 5
        for k in range(2):
            _png(folder / 'train' / wnids[index] / f'{k}.png', np.full((30, 40, 3), colour))
        _png(folder / 'val' / wnids[index] / 'v.JPEG.png', np.full((24, 24, 3), colour))
    _png(folder / 'train' / wnids[1] / 'not_in_subset.png', rng.integers(0, 256, size=(8, 8, 3)))
    return wnids


def test_imagenette_from_imagenet_folder(tmp_path):
    _write_imagenet(tmp_path, 'imagenette')
    record = load_dataset('imagenette', str(tmp_path), res=16)
    assert record.im_size == (16, 16) and record.num_classes == 10
    assert record.images_train.shape == (20, 3, 16, 16) and record.images_test.shape == (10, 3, 16, 16)
    assert record.class_names[1] == f'n{217:08d}'
    assert record.mean == [0.485, 0.456, 0.406]
    pixels = record.denormalize(record.images_train)
    for label in range(10):
        expected = torch.tensor((20 * label + 5) / 255.0)
        assert torch.allclose(pixels[record.labels_train == label], expected, atol=1e-5)
    via_subset = load_dataset('ImageNet', str(tmp_path), subset='imagenette', res=16)
    assert via_subset.name == 'imagenette'
    assert torch.equal(via_subset.images_test, record.images_test)


def test_imagenet_subset_needs_all_class_folders(tmp_path):
    (tmp_path / 'train' / 'n00000000').mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        load_dataset('imagewoof', str(tmp_path))
    assert '1000' in str(info.value) and str(tmp_path) in str(info.value)


# --------------------------------------------------------------------------------------------------
# MHIST
# --------------------------------------------------------------------------------------------------

def _write_mhist(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    rng = np.random.default_rng(3)
    lines = ['Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition']
    for name, label, partition in rows:
        _png(folder / 'images' / name, rng.integers(0, 256, size=(12, 12, 3)))
        lines.append(f'{name},{label},3,{partition}')
    (folder / 'annotations.csv').write_text('\n'.join(lines) + '\n')


def test_mhist_miniature(tmp_path):
    rows = [('a.png', 'HP', 'train'), ('b.png', 'SSA', 'train'), ('c.png', 'HP', 'train'),
            ('d.png', 'SSA', 'test'), ('e.png', 'HP', 'test')]
    _write_mhist(tmp_path, rows)
    record = load_dataset('MHIST', str(tmp_path), res=8)
    assert record.class_names == ['HP', 'SSA'] and record.im_size == (8, 8)
    assert record.labels_train.tolist() == [0, 1, 0] and record.labels_test.tolist() == [1, 0]
    assert record.images_train.shape == (3, 3, 8, 8)
    per_channel = record.images_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(3), atol=1e-3)
    assert load_dataset('MHIST', str(tmp_path)).im_size == (224, 224)


@pytest.mark.parametrize('name', ['../outside.png', '/etc/passwd', 'sub/../../outside.png', ''])
def test_mhist_image_names_stay_inside_the_images_folder(tmp_path, name):
    _write_mhist(tmp_path, [('a.png', 'HP', 'train'), ('b.png', 'SSA', 'test')])
    (tmp_path / 'outside.png').write_bytes((tmp_path / 'images' / 'a.png').read_bytes())
    csv_path = tmp_path / 'annotations.csv'
    csv_path.write_text(csv_path.read_text().replace('a.png,', f'{name},', 1))
    with pytest.raises(DatasetError, match='is not a file name inside'):
        load_dataset('MHIST', str(tmp_path), res=8)


def test_mhist_bad_label(tmp_path):
    _write_mhist(tmp_path, [('a.png', 'HP', 'train'), ('b.png', 'TA', 'test')])
    with pytest.raises(DatasetError, match='TA'):
        load_dataset('MHIST', str(tmp_path), res=8)


# --------------------------------------------------------------------------------------------------
# ZCA
# --------------------------------------------------------------------------------------------------

def test_zca_whitens_and_inverts():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=generator)
    images = (torch.randn(500, 12, generator=generator) @ mixing + 3.0).reshape(500, 3, 2, 2)
    zca = ZCA.fit(images, eps=1e-6)
    white = zca(images).reshape(500, -1).double()
    cov = torch.cov(white.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(white.mean(dim=0), torch.zeros(12, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(zca.inverse(zca.transform(images)), images, atol=1e-4)
    assert torch.allclose(zca.transform(images, batch_size=7), zca.transform(images), atol=1e-5)


def test_zca_state_dict_round_trip(tmp_path):
    images = torch.rand(40, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    zca = ZCA.fit(images)
    torch.save(zca.state_dict(), tmp_path / 'zca.pt')
    restored = ZCA.from_state_dict(torch.load(tmp_path / 'zca.pt', weights_only=True))
    assert restored.shape == (2, 2, 2) and restored.eps == pytest.approx(0.1)
    assert torch.equal(restored(images), zca(images))


def _fake_loader(data_path, *, download=False, res=None, subset=None):
    generator = torch.Generator().manual_seed(4)
    return RawSplits(channel=2, im_size=(3, 3), class_names=['a', 'b'], mean=[0.5, 0.5], std=[0.25, 0.25],
                     images_train=torch.rand(200, 2, 3, 3, generator=generator),
                     labels_train=torch.arange(200) % 2,
                     images_test=torch.rand(20, 2, 3, 3, generator=generator),
                     labels_test=torch.arange(20) % 2)


def test_load_dataset_with_zca(monkeypatch):
    monkeypatch.setitem(DATASETS, 'FakeSet', _fake_loader)
    raw = _fake_loader('')
    record = load_dataset('FakeSet', zca=True)
    assert isinstance(record.zca, ZCA)
    assert torch.allclose(record.denormalize(record.images_train), raw.images_train, atol=1e-4)
    assert torch.allclose(record.zca.inverse(record.images_test), raw.images_test, atol=1e-4)
    plain = load_dataset('fakeset')  # case-insensitive lookup
    assert plain.zca is None
    assert torch.allclose(plain.images_train, (raw.images_train - 0.5) / 0.25, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Real-image sampler
# --------------------------------------------------------------------------------------------------

def _toy_set():
    labels = torch.tensor([0, 1, 2] * 5 + [1, 1])  # class sizes 5, 7, 5
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return images, labels


def test_real_sampler_draws_distinct_images_of_the_class():
    images, labels = _toy_set()
    sampler = RealSampler(images, labels, 3, 'cpu')
    assert sampler.class_counts == [5, 7, 5] and len(sampler) == 17
    rng_state = torch.get_rng_state()
    drawn = sampler.get_images(1, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng_state)
    ids = drawn[:, 0, 0, 0].long()
    assert drawn.shape == (4, 1, 2, 2) and len(set(ids.tolist())) == 4
    assert (labels[ids] == 1).all()
    again = sampler.get_images(1, 4, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    assert sampler.get_images(0, 50, torch.Generator().manual_seed(0)).shape[0] == 5  # clamped


def test_real_sampler_all_classes_and_random_baseline():
    images, labels = _toy_set()
    sampler = RealSampler(images, labels, 3, torch.device('cpu'))
    batch, batch_labels = sampler.get_images_all(2, torch.Generator().manual_seed(1))
    assert batch.shape == (6, 1, 2, 2) and batch_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(labels[batch[:, 0, 0, 0].long()], batch_labels)
    record = DatasetRecord(name='toy', channel=1, im_size=(2, 2), num_classes=3, class_names=['a', 'b', 'c'],
                           mean=[0.0], std=[1.0], images_train=images, labels_train=labels,
                           images_test=images, labels_test=labels)
    from_record = sample_random_real(record, 3, torch.Generator().manual_seed(2))
    from_sampler = sample_random_real(sampler, 3, torch.Generator().manual_seed(2))
    assert from_record[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(from_record[0], from_sampler[0])
    with pytest.raises(DatasetError, match='ipc=6'):
        sample_random_real(record, 6, torch.Generator())
