"""Losses, DC / DSA / DM steps, the evaluation protocol and the run loop, on tiny generated data."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import methods
import networks
import chunked
import evaluation
import utils
from sets import files
from methods.dc import get_loops
from methods.losses import (attention_matching_loss, class_means, gradient_match_distance, layerwise_distance,
                            mean_embedding_distance, spatial_attention)
from methods.runner import RunInterrupted, RunOptions, StopFlag, run_distillation
from tiny_data import build_method, tiny_record, image_loss_addon

CPU = torch.device("cpu")


# ----- losses ---------------------------------------------------------------------------------
def test_layerwise_distance_matches_hand_computation():
    g_syn = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g_real = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    # row 1: 1 - 1/(1*sqrt2 + 1e-6); row 2: 1 - (-6)/(2*3 + 1e-6)
    expected = (1 - 1 / (math.sqrt(2) + 1e-6)) + (1 + 6 / (6 + 1e-6))
    assert layerwise_distance(g_syn, g_real).item() == pytest.approx(expected, rel=1e-6)


def test_ours_ignores_1d_and_reshapes_conv():
    conv_syn, conv_real = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    bias_syn, bias_real = torch.randn(4), torch.randn(4)
    with_bias = gradient_match_distance([conv_syn, bias_syn], [conv_real, bias_real], "ours")
    without = gradient_match_distance([conv_syn], [conv_real], "ours")
    assert with_bias.item() == pytest.approx(without.item())
    rows = 1 - F.cosine_similarity(conv_syn.reshape(4, -1), conv_real.reshape(4, -1), dim=1, eps=0)
    assert without.item() == pytest.approx(rows.sum().item(), rel=1e-4)
    assert gradient_match_distance([bias_syn], [bias_real], "ours").item() == 0.0


def test_mse_and_cos_metrics():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], [torch.tensor([0.0, 2.0]), torch.tensor([[1.0]])]
    assert gradient_match_distance(a, b, "mse").item() == pytest.approx(1.0 + 4.0)
    va, vb = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 1.0])
    expected = 1 - (va @ vb) / (va.norm() * vb.norm() + 1e-6)
    assert gradient_match_distance(a, b, "cos").item() == pytest.approx(expected.item(), rel=1e-6)
    assert gradient_match_distance(a, a, "ours").item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="dis_metric"):
        gradient_match_distance(a, b, "l1")


def test_dm_loss_zero_when_class_means_coincide():
    labels = torch.tensor([0, 0, 1, 1, 2])
    real = torch.randn(5, 7)
    means = class_means(real, labels, 3)
    assert torch.allclose(means[0], real[:2].mean(0)) and torch.allclose(means[2], real[4])
    syn = means.clone()  # one synthetic image per class, equal to the real class mean
    assert mean_embedding_distance(means, class_means(syn, torch.arange(3), 3)).item() == pytest.approx(0.0, abs=1e-10)
    assert mean_embedding_distance(means, means + 1).item() == pytest.approx(3 * 7)


def test_spatial_attention_matches_hand_computation():
    a = torch.tensor([[[[1.0, -2.0]], [[0.0, 1.0]]]])  # (1, C=2, H=1, W=2)
    raw = torch.tensor([[1.0 ** 4 + 0.0, 2.0 ** 4 + 1.0]])  # sum over channels of |A|^4
    assert torch.allclose(spatial_attention(a, power=4), raw / raw.norm())
    assert torch.allclose(spatial_attention(a, power=1, normalize=False), torch.tensor([[1.0, 3.0]]))


def test_attention_loss_zero_when_class_statistics_coincide():
    labels = torch.tensor([0, 0, 1, 1])
    att = [torch.rand(4, 6), torch.rand(4, 3)]
    emb = torch.randn(4, 5)
    att_real = [class_means(a, labels, 2) for a in att]
    emb_real = class_means(emb, labels, 2)
    # one synthetic sample per class, equal to the real class means
    att_syn = [class_means(a, torch.arange(2), 2) for a in att_real]
    emb_syn = class_means(emb_real, torch.arange(2), 2)
    loss = attention_matching_loss(att_real, att_syn, emb_real, emb_syn, 0.01)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    shifted = attention_matching_loss(att_real, att_syn, emb_real, emb_syn + 1, 0.5)
    assert shifted.item() == pytest.approx(100 * 0.5 * 2 * 5)
    moved = attention_matching_loss([att_real[0] + 0.5, att_real[1]], att_syn, emb_real, emb_syn, 0.5)
    assert moved.item() == pytest.approx(100 * 0.25 * 2 * 6)


def test_get_loops_table_and_other_ipc():
    assert get_loops(1) == (1, 1) and get_loops(10) == (10, 50) and get_loops(50) == (50, 10)
    assert get_loops(15) == get_loops(20)   # tie goes to the larger tabulated ipc
    assert get_loops(100) == get_loops(50)
    with pytest.raises(ValueError, match="ipc"):
        get_loops(0)


# ----- methods ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,overrides", [
    ("DC", {"init": "noise", "lr_img": 0.1}),
    ("DSA", {"init": "noise", "lr_img": 0.1}),
    ("DM", {"init": "noise", "lr_img": 1.0}),
    ("DM", {"init": "real", "lr_img": 1.0, "dsa_strategy": "none"}),
    ("DataDAM", {"init": "noise", "lr_img": 1.0}),
])
def test_steps_lower_the_loss_and_change_images(method, overrides):
    record = tiny_record()
    m = build_method(method, record, **overrides)
    syn = m.init_synthetic()
    start = syn.images.detach().clone()
    # Losses are stochastic (fresh networks and real batches), so compare averages of a few
    # evaluations of the loss on the same networks before and after some steps.
    if method in ("DM", "DataDAM"):
        m.dsa_strategy = ""  # deterministic comparison of the loss itself

    def probe_loss():
        torch.manual_seed(123)
        m.generator.manual_seed(123)
        if method in ("DM", "DataDAM"):
            return sum(m.loss(syn).item() for _ in range(3))
        total = 0.0
        for _ in range(3):
            net = m.new_network()
            total += m.matching_loss(net, syn).item()
        return total

    before = probe_loss()
    torch.manual_seed(1)
    for iteration in range(1, 16):
        logs = m.step(syn, iteration)
        assert torch.isfinite(logs["loss"])
    after = probe_loss()
    assert not torch.equal(syn.images.detach(), start)
    assert after < before, f"{method}: loss {before:.4f} -> {after:.4f}"
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_dc_with_batchnorm_model_and_inner_loop():
    record = tiny_record()
    m = build_method("DC", record, outer_loop=2, inner_loop=2)
    m.cfg = m.cfg.replace(model="ConvNetBN")
    syn = m.init_synthetic()
    before = syn.images.detach().clone()
    logs = m.step(syn, 1)
    assert torch.isfinite(logs["loss"]) and not torch.equal(before, syn.images.detach())


def test_plain_dc_ignores_dsa_strategy():
    record = tiny_record()
    m = build_method("DC", record, dsa_strategy="color_crop")
    assert m.dsa_strategy == "" and not m.uses_dsa
    assert build_method("DSA", record).uses_dsa


def test_unknown_method_lists_choices():
    with pytest.raises(KeyError, match="DC"):
        methods.get_method_class("XYZ")
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("DC")(type("Other", (methods.DistillMethod,), {}))


# ----- evaluation ---------------------------------------------------------------------------
def test_evaluate_synset_learns_an_easy_problem():
    record = tiny_record(num_classes=3, per_class=30)
    cfg = evaluation.EvalConfig(epochs=30, lr=0.01, batch_train=16)
    result = evaluation.evaluate_synset(record.images_train, record.labels_train, "ConvNetW32", 3, record.images_test,
                                   record.labels_test, cfg, num_eval=2, device=CPU, seed=0)
    assert len(result.accs) == 2 and result.acc_mean > 0.9


def test_evaluate_synset_is_seeded_and_leaves_global_rng_alone():
    record = tiny_record()
    cfg = evaluation.EvalConfig(epochs=2, batch_train=8, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    state = torch.get_rng_state()
    a = evaluation.evaluate_synset(record.images_train, record.labels_train, "ConvNetW32", 3, record.images_test,
                              record.labels_test, cfg, num_eval=1, device=CPU, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    b = evaluation.evaluate_synset(record.images_train, record.labels_train, "ConvNetW32", 3, record.images_test,
                              record.labels_test, cfg, num_eval=1, device=CPU, seed=5)
    assert a.accs == b.accs


def test_lr_schedule_decays_after_half(monkeypatch):
    record = tiny_record()
    seen = []
    real_sgd = torch.optim.SGD

    def spy(params, lr, **kwargs):
        seen.append(lr)
        return real_sgd(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    evaluation.train_and_test(networks.get_network("ConvNetW32", 1, 3, (8, 8)), record.images_train, record.labels_train,
                         record.images_test, record.labels_test, evaluation.EvalConfig(epochs=4, lr=0.1, batch_train=64),
                         utils.make_generator(0))
    assert seen == [0.1, pytest.approx(0.01)]


# ----- run loop: results file, resume ---------------------------------------------------------
def run_opts(tmp_path, name, **kw):
    base = dict(num_exp=1, num_eval=1, eval_it=0, eval_models=("ConvNetW32",), epoch_eval_train=2, seed=3,
                run_dir=str(tmp_path / name), checkpoint_every=0)
    base.update(kw)
    return RunOptions(**base)


def small_cfg(method="DC", **kw):
    fields = dict(method=method, dataset="Tiny3", model="ConvNetW32", ipc=2, iterations=6, lr_img=0.1,
                  batch_real=8, batch_train=8, init="noise", dsa_strategy="")
    fields.update(kw)
    return methods.DistillConfig(**fields)


def test_run_writes_reference_format(tmp_path):
    record = tiny_record()
    outcome = run_distillation(small_cfg(iterations=2), run_opts(tmp_path, "fmt", num_exp=2), record, CPU)
    blob = files.load_results(outcome.result_path)
    assert os.path.basename(outcome.result_path) == "res_DC_Tiny3_ConvNetW32_2ipc.pt"
    assert len(blob["data"]) == 2
    image_syn, label_syn = blob["data"][0]
    assert image_syn.shape == (6, 1, 8, 8) and image_syn.dtype == torch.float32
    assert label_syn.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(blob["accs_all_exps"]["ConvNetW32"]) == 2
    assert all(0 <= a <= 1 for a in blob["accs_all_exps"]["ConvNetW32"])
    for name in ("summary.csv", "results.json", "config.yaml"):
        assert os.path.isfile(os.path.join(outcome.run_dir, name))
    assert outcome.vis_paths and os.path.isfile(outcome.vis_paths[-1])


def test_zca_run_saves_the_whitening_and_pictures_in_pixel_space(tmp_path):
    from data import ZCA

    record = tiny_record()
    record.zca = ZCA.fit(record.images_train, eps=0.1)
    record.images_train, record.images_test = record.zca(record.images_train), record.zca(record.images_test)
    outcome = run_distillation(small_cfg("DM", init="real", lr_img=0.01, iterations=1),
                               run_opts(tmp_path, "zca", num_eval=0), record, CPU)
    meta = files.load_results(outcome.result_path)["meta"]
    restored = ZCA.from_state_dict(meta["zca"])
    image_syn = files.load_results(outcome.result_path)["data"][0][0]
    assert torch.allclose(restored.inverse(image_syn), record.zca.inverse(image_syn), atol=1e-5)
    assert os.path.isfile(outcome.vis_paths[-1])


def test_reference_layout_file_loads(tmp_path):
    path = tmp_path / "res_DSA_X.pt"
    torch.save({"data": [[torch.randn(10, 3, 32, 32), torch.arange(10)]], "accs_all_exps": {"ConvNet": [0.5]}}, path)
    blob = files.load_results(str(path))
    assert blob["data"][0][0].shape == (10, 3, 32, 32)
    torch.save({"images": torch.randn(2)}, tmp_path / "bad.pt")
    with pytest.raises(utils.UserError, match="reference layout"):
        files.load_results(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("method", ["DSA", "DM"])
def test_resume_equals_uninterrupted(tmp_path, method):
    record = tiny_record()
    extra = {"dsa_strategy": "color_crop_cutout_flip_scale_rotate"} if method == "DSA" else {"init": "real", "lr_img": 1.0}
    cfg = small_cfg(method, **extra)
    full = run_distillation(cfg, run_opts(tmp_path, "full"), record, CPU)

    stop = StopFlag()

    def interrupt(exp, iteration, logs):
        if iteration == 3:
            stop.requested = True  # what the SIGINT/SIGTERM handler does

    with pytest.raises(RunInterrupted):
        run_distillation(cfg, run_opts(tmp_path, "cut"), record, CPU, stop=stop, on_iteration=interrupt)
    assert not os.path.exists(os.path.join(tmp_path, "cut", "res_%s_Tiny3_ConvNetW32_2ipc.pt" % method))
    resumed = run_distillation(cfg, run_opts(tmp_path, "cut", resume=True), record, CPU)
    a = files.load_results(full.result_path)["data"][0][0]
    b = files.load_results(resumed.result_path)["data"][0][0]
    assert torch.equal(a, b)
    assert full.accs_all_exps == resumed.accs_all_exps


def test_resume_refuses_other_config(tmp_path):
    record = tiny_record()
    stop = StopFlag()
    stop.requested = True
    with pytest.raises(RunInterrupted):
        run_distillation(small_cfg(), run_opts(tmp_path, "x"), record, CPU, stop=stop)
    with pytest.raises(utils.UserError, match="ipc"):
        run_distillation(small_cfg(ipc=1), run_opts(tmp_path, "x", resume=True), record, CPU)


def test_nan_loss_raises(tmp_path):
    record = tiny_record()
    with pytest.raises(FloatingPointError, match="lr_img"):
        run_distillation(small_cfg("DM", lr_img=1e30, init="real", iterations=4), run_opts(tmp_path, "nan"), record, CPU)


@pytest.mark.parametrize("model,power", [("ConvNetBN", 1.0), ("ConvNetD2", 4.0), ("ConvNetD4", 4.0)])
def test_datadam_runs_on_other_norms_and_depths(model, power):
    record = tiny_record(size=16)
    m = build_method("DataDAM", record, init="real", attention_power=power, model=model)
    assert m.options.attention_power == power
    syn = m.init_synthetic()
    before = syn.images.detach().clone()
    logs = m.step(syn, 1)
    assert torch.isfinite(logs["loss"]) and logs["loss"] > 0
    assert not torch.equal(before, syn.images.detach())
    assert type(m).eval_epochs == (1800, 1800)


def test_pass_size_keeps_batchnorm_statistics_whole():
    images = torch.randn(100, 1, 8, 8)
    bn = networks.get_network("ConvNetBN", 1, 3, (8, 8)).train()
    assert chunked.pass_size(bn, images) == 100           # batch statistics: one pass
    assert chunked.pass_size(bn.eval(), images) == chunked.CPU_CHUNK  # frozen BN: per-sample
    assert chunked.pass_size(networks.get_network("ConvNet", 1, 3, (8, 8)), images) == chunked.CPU_CHUNK
    net = networks.get_network("ConvNetW32", 1, 3, (8, 8))
    embedded = chunked.embed_in_chunks(net, images)
    with torch.no_grad():
        assert torch.allclose(embedded, net.embed(images), atol=1e-5)


@pytest.mark.parametrize("method,overrides", [
    ("DC", {}), ("DSA", {}), ("DM", {}), ("DataDAM", {}),
    ("CAFE", {"watcher_window": 2, "watcher_images": 2, "max_outer_steps": 2, "max_inner_steps": 1}),
])
def test_regularizers_join_every_image_update(method, overrides):
    """The hook CLoM-style add-ons use: every method's image update includes every add-on's image_loss."""
    record = tiny_record()
    calls = []

    plain, regularized = build_method(method, record, init="real", **overrides), build_method(method, record, init="real", **overrides)
    weight = 0.25 / regularized.cfg.lr_img  # one SGD step on weight * |x|^2 alone halves the images

    def pull_to_zero(syn):
        calls.append(1)
        return weight * (syn.images ** 2).sum()

    regularized.addons.append(image_loss_addon(pull_to_zero))
    syn_plain, syn_reg = plain.init_synthetic(), regularized.init_synthetic()
    torch.manual_seed(5)
    plain.step(syn_plain, 1)
    torch.manual_seed(5)
    regularized.step(syn_reg, 1)
    assert calls, f"{method} never called the regulariser"
    assert syn_reg.images.norm() < syn_plain.images.norm()
