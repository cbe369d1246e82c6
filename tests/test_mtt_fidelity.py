"""Trajectory matching as the references do it: PAD's parameter selection (NUS-HPC-AI-Lab/PAD
distill/PAD.py and PAD_depth.py), MTT's minibatches and expert draws (GeorgeCazenavette/mtt-distillation
distill.py) and DATM's initial images and soft labels (NUS-HPC-AI-Lab/DATM distill/DATM.py)."""
import glob
import os
import shutil
import types

import pytest
import torch

from cli import distill_flags
from methods.datm import PAD
from methods.mtt import ExpertStream, trajectory_matching_loss
from pretrained import buffers
import utils
from tiny_data import MTT_MODEL, build_mtt, tiny_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD_PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "PAD", "*.yaml")))


def kept_entries(loss_ratio, depth_ratio, size=1000):
    """Which of ``size`` parameter entries the matching loss depends on (a nonzero gradient)."""
    target = torch.zeros(size)
    start = torch.ones(size)
    student = (torch.arange(size, dtype=torch.float32).flip(0) + 1).requires_grad_(True)
    trajectory_matching_loss(student, start, target, loss_ratio, depth_ratio).backward()
    return student.grad != 0


def preset_options(path, *flags):
    args = distill_flags.parse_args(["--config", path, *flags])
    cfg, _ = distill_flags.resolve(args)
    return PAD.resolve_options(cfg.extra)


@pytest.mark.parametrize("path", PAD_PRESETS, ids=[os.path.basename(p) for p in PAD_PRESETS])
def test_pad_preset_keeps_the_released_fraction_of_parameter_entries(path):
    options = preset_options(path)
    assert options.param_selection == "loss"
    loss_ratio, depth_ratio = PAD.selection_ratios(types.SimpleNamespace(options=options))
    assert (loss_ratio, depth_ratio) == (options.loss_ratio, 0.0)
    kept = kept_entries(loss_ratio, depth_ratio)
    assert kept.float().mean().item() == pytest.approx(1.0 - options.loss_ratio)


def test_pad_default_is_the_loss_selection_and_the_depth_variant_is_reachable():
    path = os.path.join(ROOT, "configs", "PAD", "CIFAR10_ipc10.yaml")
    assert PAD.resolve_options({}).param_selection == "loss"
    # 0.5 / 0.5 keeps half the entries (released PAD.py), not a quarter
    assert kept_entries(*PAD.selection_ratios(types.SimpleNamespace(options=preset_options(path)))).sum() == 500
    depth = preset_options(path, "--param_selection", "depth")
    kept = kept_entries(*PAD.selection_ratios(types.SimpleNamespace(options=depth)))
    assert not kept[:500].any() and kept[500:].all()  # only the deepest half (PAD_depth.py)
    both = preset_options(path, "--param_selection", "both")
    assert kept_entries(*PAD.selection_ratios(types.SimpleNamespace(options=both))).sum() == 250


def test_pad_method_applies_the_chosen_selection(buffer_root, one_thread):
    m, _ = build_mtt("PAD", buffer_root, param_selection="depth", depth_ratio=0.5, loss_ratio=0.3)
    assert m.selection_ratios() == (0.0, 0.5)
    student, start, target = torch.arange(10.0), torch.zeros(10), torch.ones(10)
    assert m.matching_loss(student, start, target).item() == pytest.approx(
        trajectory_matching_loss(student, start, target, depth_ratio=0.5).item())
    with pytest.raises(utils.UserError, match="param_selection"):
        build_mtt("PAD", buffer_root, param_selection="deep")


def test_mtt_draws_a_fresh_permutation_every_iteration_and_uses_the_short_chunk(buffer_root, one_thread,
                                                                                 monkeypatch):
    # 6 images in chunks of 4: each iteration splits a new permutation into [4, 2] and takes the
    # short chunk first (the reference pops chunks from the end); 3 steps need a second permutation.
    m, _ = build_mtt("MTT", buffer_root, batch_syn=4, syn_steps=3, no_aug=True)
    syn = m.init_synthetic()
    drawn, seen = [], []
    real_randperm = torch.randperm

    def recording_randperm(n, *args, **kwargs):
        drawn.append(real_randperm(n, *args, **kwargs))
        return drawn[-1]

    real_next_batch = m.next_batch

    def recording_next_batch(total):
        seen.append(real_next_batch(total).tolist())
        return torch.tensor(seen[-1])

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    monkeypatch.setattr(m, "next_batch", recording_next_batch)
    m.step(syn, 0)
    m.step(syn, 1)
    permutations = [p.tolist() for p in drawn if p.numel() == 6]
    assert len(permutations) == 4  # two per iteration, none carried over
    expected = []
    for first, second in (permutations[:2], permutations[2:]):
        expected += [first[4:], first[:4], second[4:]]
    assert seen == expected


def tagged_buffer(root, files=4, experts=3):
    """A buffer of ``files`` chunk files whose expert j of file i has every parameter equal to
    ``10 * i + j`` (made from the tiny buffer's first expert); returns its directory."""
    record = tiny_record()
    source = buffers.buffer_dir(root, record.name, MTT_MODEL, False)
    template = buffers.load_chunk(buffers.chunk_path(source, 0))[0]
    directory = os.path.join(root, "tagged")
    os.makedirs(directory)
    shutil.copy(os.path.join(source, buffers.MANIFEST_NAME), directory)
    for i in range(files):
        chunk = [[[torch.full_like(t, 10.0 * i + j) for t in snapshot] for snapshot in template]
                 for j in range(experts)]
        torch.save(chunk, buffers.chunk_path(directory, i))
    return directory


def tag(trajectory):
    return int(trajectory[0][0].flatten()[0])


def test_max_files_keeps_shuffled_files_for_mtt_and_the_first_for_datm(buffer_root, tmp_path):
    shutil.copytree(buffer_root, tmp_path / "root")
    directory = tagged_buffer(str(tmp_path / "root"))
    chosen = set()
    for seed in range(8):
        stream = ExpertStream(directory, {}, utils.make_generator(seed), max_files=2)
        assert len(stream.files) == 2
        files = {tag(stream.next()) // 10 for _ in range(12)}  # two passes over 2 files x 3 experts
        assert files == {int(name.split("_")[-1].split(".")[0]) for name in stream.files}
        chosen.add(tuple(sorted(files)))
    assert len(chosen) > 1 and chosen != {(0, 1)}  # not always the first two files
    datm = ExpertStream(directory, {}, utils.make_generator(0), max_files=2, shuffle_files=False)
    assert sorted(datm.files) == ["replay_buffer_0.pt", "replay_buffer_1.pt"]


def test_load_all_draws_experts_with_replacement(buffer_root, tmp_path):
    shutil.copytree(buffer_root, tmp_path / "root")
    directory = tagged_buffer(str(tmp_path / "root"), files=2, experts=2)
    stream = ExpertStream(directory, {}, utils.make_generator(0), load_all=True)
    draws = [tag(stream.next()) for _ in range(40)]
    assert set(draws) == {0, 1, 10, 11}
    # a walk without replacement would use each of the 4 experts once in every 4 draws
    assert any(len(set(draws[k:k + 4])) < 4 for k in range(0, 40, 4))
    state = stream.state_dict()
    again = ExpertStream(directory, {}, utils.make_generator(1), load_all=True)
    again.load_state_dict(state)
    assert again.files == stream.files


def test_datm_takes_initial_images_from_expert_0_of_file_0_and_labels_from_every_file(buffer_root, tmp_path,
                                                                                     one_thread):
    m, _ = build_mtt("DATM", buffer_root)
    judges = m.final_snapshots()
    path = buffers.chunk_path(m.buffer_dir, 0)
    assert all(torch.equal(a, b) for a, b in zip(judges[0], buffers.load_chunk(path)[0][-1]))
    # labels: averaged over the experts of every file; a second file (copies of the experts with
    # other final snapshots) changes them
    syn = m.init_synthetic()
    assert torch.equal(m.expert_logits(judges[0], syn.images.detach()).argmax(1), syn.labels)
    expected = m.label_logits_from_experts(judges, syn.images.detach(), syn.labels)
    assert torch.allclose(syn.label_logits.detach(), expected)
    shutil.copytree(buffer_root, tmp_path / "root")
    directory = buffers.buffer_dir(str(tmp_path / "root"), m.cfg.dataset, MTT_MODEL, False)
    chunk = buffers.load_chunk(buffers.chunk_path(directory, 0))
    torch.save([[*trajectory[:-1], [2.0 * t for t in trajectory[-1]]] for trajectory in chunk],
               buffers.chunk_path(directory, 1))
    m2, _ = build_mtt("DATM", str(tmp_path / "root"))
    assert len(m2.final_snapshots()) == 2 * len(judges)
    syn2 = m2.init_synthetic()
    one_file = m2.label_logits_from_experts(judges, syn2.images.detach(), syn2.labels)
    assert torch.allclose(syn2.label_logits.detach(),
                          m2.label_logits_from_experts(m2.final_snapshots(), syn2.images.detach(), syn2.labels))
    assert not torch.allclose(syn2.label_logits.detach(), one_file)


def test_datm_falls_back_to_other_experts_when_a_class_is_short(buffer_root, one_thread):
    m, _ = build_mtt("DATM", buffer_root)
    judges = m.final_snapshots()
    # a judge that never predicts class 0: its final layer's bias pushes class 0 down
    blind = [t.clone() for t in judges[0]]
    blind[-1][0] = -1e6
    picked = m.correctly_classified(0, [blind, judges[0]])
    assert picked.shape[0] == m.cfg.ipc
    assert torch.equal(m.expert_logits(judges[0], picked).argmax(1), torch.zeros(m.cfg.ipc, dtype=torch.long))
    with pytest.raises(utils.UserError, match="class 0"):
        m.correctly_classified(0, [blind])
