"""NCFM: the characteristic-function loss against a hand computation, multi-formation decoding and
the mix initialisation, a step that lowers the loss, bit-exact resume, the pool check, and the
evaluation protocol (AdamW + multistep, CutMix with p 0.5, decoding) recorded and replayed."""
import json

import pytest
import torch

import evaluation
import methods
import utils
from methods.ncfm import batch_augment, cf_loss, mix_grid, ncfm_match_loss
from methods.run_config import RunInterrupted, RunOptions, StopFlag, eval_protocol
from methods.runner import run_distillation
from sets import files
from tiny_data import CPU, MTT_MODEL, build_method, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the loss -------------------------------------------------------------------------------
def hand_loss(real, syn, t, alpha=0.5, beta=0.5):
    """300 * mean_t sqrt(alpha amp + beta phase) with complex numbers, one frequency at a time."""
    real = real / real.norm(dim=1, keepdim=True)
    syn = syn / syn.norm(dim=1, keepdim=True)
    terms = []
    for row in t:
        phi_r = torch.exp(1j * (real.double() @ row.double())).mean()
        phi_s = torch.exp(1j * (syn.double() @ row.double())).mean()
        amp = (abs(phi_r) - abs(phi_s)) ** 2
        phase = max(2 * (abs(phi_r) * abs(phi_s) - (phi_r * phi_s.conj()).real), 1e-12)
        terms.append(torch.sqrt(alpha * amp + beta * phase))
    return 300 * torch.stack(terms).mean()


def test_match_loss_equals_a_hand_computation_on_fixed_frequencies():
    g = torch.Generator().manual_seed(0)
    real, syn, t = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(11, 5, generator=g)
    got = ncfm_match_loss(real, syn, t)
    assert torch.allclose(got.double(), hand_loss(real, syn, t), rtol=1e-5, atol=1e-6)
    weighted = ncfm_match_loss(real, syn, t, alpha=0.8, beta=0.2)
    assert torch.allclose(weighted.double(), hand_loss(real, syn, t, 0.8, 0.2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, weighted)
    # the same distribution: only float rounding above the clamped phase floor sqrt(0.5e-12) remains
    same = cf_loss(real.double(), real.double(), t.double())
    assert (0.5 * 1e-12) ** 0.5 <= same.item() < 1e-5 and cf_loss(real, syn, t) > 1e-2
    # scale-invariant in the features (L2-normalised), differentiable in the synthetic ones
    syn.requires_grad_(True)
    loss = ncfm_match_loss(3 * real, syn, t)
    assert torch.allclose(loss, got)
    loss.backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


# ---- multi-formation ------------------------------------------------------------------------
def test_factor_two_decodes_one_stored_image_into_four():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    images, labels = evaluation.decode_zoom(image, torch.tensor([2]), 2)
    assert images.shape == (4, 1, 4, 4) and labels.tolist() == [2, 2, 2, 2]
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # crops row-major, each upsampled
        crop = image[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        assert torch.allclose(images[k], torch.nn.functional.interpolate(crop, size=(4, 4), mode="bilinear",
                                                                         align_corners=False)[0])
    # crop-major over a batch, labels (N,) or (N, K) repeated alike
    batch, rows = evaluation.decode_zoom(torch.randn(3, 2, 6, 6), torch.eye(3), 2)
    assert batch.shape == (12, 2, 6, 6) and torch.equal(rows, torch.cat([torch.eye(3)] * 4))
    same, same_labels = evaluation.decode_zoom(image, torch.tensor([2]), 1)
    assert same is image and same_labels.tolist() == [2]
    odd, _ = evaluation.decode_zoom(torch.ones(1, 1, 5, 5), torch.tensor([0]), 2)  # padded to 6, crops of 3
    assert odd.shape == (4, 1, 5, 5) and odd[3].min() < 1
    with pytest.raises(ValueError, match="labels"):
        evaluation.decode_zoom(image, torch.tensor([0, 1]), 2)


def test_mix_grid_and_decoding_are_inverse_on_constant_images():
    cells = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 1, 6, 6)  # 4 cells x 2 stored images
    stored = mix_grid(cells, 2, 2)
    assert stored.shape == (2, 1, 6, 6)
    assert stored[0, 0, 0, 0] == 1 and stored[0, 0, 0, 5] == 3 and stored[0, 0, 5, 0] == 5 and stored[1, 0, 5, 5] == 8
    decoded, labels = evaluation.decode_zoom(stored, torch.tensor([0, 1]), 2)
    assert torch.equal(decoded, cells) and labels.tolist() == [0, 1] * 4


def test_batch_augment_draws_one_transform_for_the_whole_batch():
    x = torch.randn(1, 1, 8, 8).expand(4, 1, 8, 8).contiguous()
    out = batch_augment(x, "color_crop_cutout", utils.make_generator(3))
    assert out.shape == x.shape and all(torch.equal(out[0], out[k]) for k in range(4)) and not torch.equal(out, x)


# ---- the method -----------------------------------------------------------------------------
def ncfm(pretrained, **overrides):
    fields = dict(num_premodel=2, pretrain_dir=pretrained, num_freqs=256, batch_real=24, **overrides)
    return build_method("NCFM", tiny_record(per_class=16), **fields)


def fixed_loss(method, syn):
    """The matching loss under the first trained model, every real image and fixed frequencies."""
    net = method.pool[0][1]
    t = torch.randn(512, net.embed_dim, generator=torch.Generator().manual_seed(5))
    total = 0.0
    for c in range(method.num_classes):
        real = method.sampler.get_images(c, 1000, torch.Generator().manual_seed(0))  # the whole class
        images, _ = method.decoded(syn, c)
        with torch.no_grad():
            total += float(ncfm_match_loss(net.embed(real), net.embed(images), t))
    return total


def test_steps_lower_the_matching_loss_and_keep_the_set_shape(pretrained):
    method = ncfm(pretrained, ipc=1, lr_img=1.0, aug_type="", iter_calib=0)
    syn = method.init_synthetic()
    assert syn.images.shape == (3, 1, 8, 8) and syn.labels.tolist() == [0, 1, 2]
    before = fixed_loss(method, syn)
    for iteration in range(1, 9):
        logs = method.step(syn, iteration)
    assert set(logs) == {"loss", "loss_match", "loss_calib"} and float(logs["loss_calib"]) == 0
    after = fixed_loss(method, syn)
    assert after < 0.9 * before, (before, after)
    # the AdamW rate is lr_img x lr_scale_adam
    assert method.optimizer_img.param_groups[0]["lr"] == pytest.approx(0.1)


def test_calibration_and_sampling_net_run(pretrained):
    method = ncfm(pretrained, ipc=1, sampling_net=True)
    syn = method.init_synthetic()
    before = [p.detach().clone() for p in method.sampler_net.parameters()]
    logs = method.step(syn, 1)
    assert float(logs["loss_calib"]) > 0 and torch.isfinite(logs["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.sampler_net.parameters()))
    assert method.frequencies(method.pool[0][1].embed_dim).shape == (64, method.pool[0][1].embed_dim)


def test_mix_init_with_too_few_real_images_is_one_line_naming_ipc_and_factor(pretrained):
    """16 real images per class hold one 2x2 grid for each of 4 stored images, not 5."""
    method = ncfm(pretrained, ipc=5, init="mix")
    with pytest.raises(utils.UserError, match=r"--init mix: --ipc 5 with --factor 2 needs 20 real images per "
                                              r"class .*class \d has 16; lower --ipc or --factor"):
        method.init_synthetic()
    assert ncfm(pretrained, ipc=4, init="mix").init_synthetic().images.shape[0] == 12


def test_missing_pool_is_one_line_naming_the_command(pretrained):
    cfg = methods.DistillConfig(method="NCFM", dataset="Tiny3", model=MTT_MODEL,
                                extra={"num_premodel": 3, "pretrain_dir": pretrained})
    with pytest.raises(utils.UserError, match=r"--num_premodel 3: .* lacks models 2; make them with: python "
                                              r"train_original.py --dataset Tiny3 --model ConvNetW32 --num 3"):
        methods.get_method_class("NCFM").check_files(cfg)
    methods.get_method_class("NCFM").check_files(cfg.replace(extra={"num_premodel": 2, "pretrain_dir": pretrained}))


def run_config(pretrained, **fields):
    values = dict(ipc=1, iterations=4, batch_real=16, batch_train=8, init="mix", model=MTT_MODEL,
                  dsa_strategy="color_crop_flip_scale_rotate")
    values.update(fields)
    return methods.DistillConfig(method="NCFM", dataset="Tiny3", extra={"num_premodel": 2, "pretrain_dir": pretrained,
                                                                        "num_freqs": 128}, **values)


def test_ncfm_resumes_bit_exactly(pretrained, tmp_path):
    record = tiny_record()
    cfg = run_config(pretrained)

    def opts(run, **kw):
        return RunOptions(num_exp=1, num_eval=0, run_dir=str(tmp_path / run), checkpoint_every=1, save_vis=False, **kw)

    full = run_distillation(cfg, opts("full"), record, CPU)
    stop = StopFlag()

    def interrupt(exp, iteration, logs):
        stop.requested = stop.requested or iteration == 2

    with pytest.raises(RunInterrupted):
        run_distillation(cfg, opts("cut"), record, CPU, stop=stop, on_iteration=interrupt)
    resumed = run_distillation(cfg, opts("cut", resume=True), record, CPU)
    a, b = (files.load_results(outcome.result_path)["data"][0] for outcome in (full, resumed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- the evaluation protocol ----------------------------------------------------------------
def test_protocol_defaults_leave_todays_protocol_unchanged():
    protocol = evaluation.EvalProtocol()
    assert protocol.as_dict() == evaluation.EvalProtocol.from_dict(protocol.as_dict()).as_dict()
    assert "mix_p" not in protocol.as_dict() and "decode_factor" not in protocol.as_dict()
    assert protocol.resolve("Tiny3", "ConvNet", "ConvNet", 1).is_default_student
    for bad, message in (({"mix_p": 1.5}, "--mix_p"), ({"decode_factor": 0}, "--decode_factor"),
                         ({"adamw_schedule": "step"}, "--adamw_schedule")):
        with pytest.raises(ValueError, match=message):
            evaluation.EvalProtocol(**bad)


def test_multistep_halves_at_each_fifth_and_mix_p_mixes_some_batches():
    assert [evaluation.multistep_factor(e, 10) for e in range(10)] == [1, 1, .5, .5, .25, .25, .125, .125, .0625,
                                                                        .0625]
    cfg = evaluation.EvalProtocol(mix_type="cutmix", mix_p=0.5)
    g = torch.Generator().manual_seed(0)
    mixed = [evaluation.draw_views(torch.arange(8), (8, 8), cfg, g).mix_type for _ in range(200)]
    assert 60 < mixed.count("cutmix") < 140 and set(mixed) == {"cutmix", "none"}
    always = evaluation.EvalProtocol(mix_type="cutmix")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = evaluation.draw_views(torch.arange(8), (8, 8), always, g1)
    b = evaluation.draw_views(torch.arange(8), (8, 8), evaluation.EvalProtocol(mix_type="cutmix", mix_p=1.0), g2)
    assert a.box == b.box and torch.equal(a.permutation, b.permutation)  # p = 1 draws nothing extra


def test_ncfm_protocol_is_its_reference_evaluation(pretrained):
    cfg = run_config(pretrained)
    protocol = eval_protocol(methods.get_method_class("NCFM"), cfg, RunOptions())
    assert protocol.epochs_augmented == 2000 and protocol.optimizer == "adamw" and protocol.adamw_lr == 1e-3
    assert protocol.adamw_schedule == "multistep" and protocol.mix_type == "cutmix" and protocol.mix_p == 0.5
    assert protocol.decode_factor == 2 and protocol.dsa_strategy == "color_crop_flip_scale_rotate"
    one = eval_protocol(methods.get_method_class("NCFM"), cfg.replace(extra={**cfg.extra, "factor": 1}), RunOptions())
    assert one.decode_factor == 1
    described = protocol.resolve("Tiny3", MTT_MODEL, MTT_MODEL, 1).describe()
    assert described["lr_schedule"] == "x0.5 after each fifth of the epochs" and described["decode_factor"] == 2


def test_decoded_sets_train_and_a_relabel_store_is_refused():
    record = tiny_record()
    cfg = evaluation.EvalProtocol(epochs_augmented=2, epochs_plain=2, optimizer="adamw", adamw_schedule="multistep",
                                  mix_type="cutmix", mix_p=0.5, decode_factor=2, batch_train=8
                                  ).resolve("Tiny3", MTT_MODEL, MTT_MODEL, 1)
    images = record.images_train[::8][:3]
    result = evaluation.evaluate_synset(images, torch.arange(3), MTT_MODEL, 3, record.images_test, record.labels_test,
                                        cfg, num_eval=1, device=CPU, progress=False)
    assert len(result.accs) == 1 and 0 <= result.accs[0] <= 1
    with pytest.raises(ValueError, match="--decode_factor 2"):
        evaluation.evaluate_synset(images, torch.arange(3), MTT_MODEL, 3, record.images_test, record.labels_test,
                                   cfg, num_eval=1, device=CPU, progress=False, soft_store=object())


def test_distill_records_the_protocol_and_evaluate_replays_it(pretrained, fake_dataset, tmp_path):
    import distill
    import evaluate

    run_dir = tmp_path / "run"
    assert distill.main(["--method", "NCFM", "--dataset", "Tiny3", "--model", MTT_MODEL, "--ipc", "1",
                         "--Iteration", "2", "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "2",
                         "--batch_real", "16", "--num_freqs", "64", "--num_premodel", "2", "--pretrain_dir",
                         pretrained, "--run_dir", str(run_dir), "--device", "cpu", "--no-vis"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    recorded = results["protocol"][MTT_MODEL]
    assert recorded["optimizer"] == "AdamW" and recorded["mix_p"] == 0.5 and recorded["decode_factor"] == 2
    assert recorded["mix_type"] == "cutmix" and recorded["adamw_schedule"] == "multistep"
    blob = files.load_results(str(run_dir / f"res_NCFM_Tiny3_{MTT_MODEL}_1ipc.pt"))
    assert blob["data"][0][0].shape == (3, 1, 8, 8)  # stored: ipc images per class, decoded when trained on
    assert blob["meta"]["protocol"]["decode_factor"] == 2
    out = tmp_path / "eval.json"
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", str(run_dir), "--model", MTT_MODEL, "--num_eval", "1",
                          "--device", "cpu", "--out", str(out)]) == 0
    replayed = json.loads(out.read_text())[MTT_MODEL]["protocol"]
    for key in ("optimizer", "mix_p", "decode_factor", "mix_type", "adamw_schedule", "epochs", "lr_schedule"):
        assert replayed[key] == recorded[key], key
    # a flag overrides the replayed field
    out2 = tmp_path / "eval2.json"
    assert evaluate.main(["--dataset", "Tiny3", "--syn_path", str(run_dir), "--model", MTT_MODEL, "--num_eval", "1",
                          "--device", "cpu", "--decode_factor", "1", "--mix_p", "1", "--out", str(out2)]) == 0
    overridden = json.loads(out2.read_text())[MTT_MODEL]["protocol"]
    assert "decode_factor" not in overridden and "mix_p" not in overridden


def test_random_real_under_multi_formation_stores_grids_of_real_images():
    from sets.comparison import random_stored_images

    record = tiny_record()
    plain, labels = random_stored_images(record, 2, 1, utils.make_generator(0))
    assert plain.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    grids, grid_labels = random_stored_images(record, 2, 2, utils.make_generator(0))
    assert grids.shape == (6, 1, 8, 8) and grid_labels.tolist() == [0, 0, 1, 1, 2, 2]
    cells, _ = evaluation.decode_zoom(grids, grid_labels, 2)
    assert cells.shape == (24, 1, 8, 8) and not torch.equal(grids, plain)


def test_distill_without_a_pool_is_one_line_before_loading_data(tmp_path, monkeypatch, capsys):
    import data
    import distill

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the pool was checked")

    monkeypatch.setattr(data, "load_dataset", no_loading)
    with pytest.raises(SystemExit) as stopped:
        distill.main(["--method", "NCFM", "--dataset", "FashionMNIST", "--pretrain_dir", str(tmp_path / "none"),
                      "--run_dir", str(tmp_path / "run"), "--device", "cpu"])
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "--num_premodel 20" in err and "python train_original.py --dataset FashionMNIST --model ConvNet --num 20" in err
