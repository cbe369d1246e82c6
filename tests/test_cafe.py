"""CAFE: the loss pieces against hand computations, the layer-weight mapping, the lr schedule, the
bounded watchers, and runs on 2 and 3 classes at 28 and 32 pixels (tiny generated data)."""
import pytest
import torch

import distill
from methods.runner import RunOptions, eval_protocol
from cli import distill_flags
import networks
from methods.cafe import CAFE, image_lr, layer_weights
from methods.features import real_class_statistics, syn_class_statistics
from methods.losses import class_means, discrimination_loss, feature_alignment_loss
from tiny_data import build_method, tiny_record


def test_feature_alignment_is_weighted_sum_of_squared_mean_differences():
    real = [torch.zeros(2, 3), torch.ones(2, 5)]
    syn = [torch.full((2, 3), 2.0), torch.ones(2, 5)]
    assert feature_alignment_loss(real, syn, [0.5, 7.0]).item() == pytest.approx(0.5 * 2 * 3 * 4)
    assert feature_alignment_loss(real, [real[0].clone(), syn[1]], [1.0, 1.0]).item() == 0.0
    with pytest.raises(ValueError, match="weights"):
        feature_alignment_loss(real, syn, [1.0])


def test_discrimination_loss_matches_explicit_cross_entropy():
    embed = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    centers = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    expected = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(3))
    assert discrimination_loss(embed, labels, centers).item() == pytest.approx(expected.item(), rel=1e-6)


def test_layer_weights_map_deepest_first():
    assert layer_weights(4, 1.0, 2.0, 3.0, 4.0) == [4.0, 3.0, 2.0, 1.0]      # depth-3 ConvNet: the reference
    assert layer_weights(2, 1.0, 2.0, 3.0, 4.0) == [2.0, 1.0]
    assert layer_weights(6, 1.0, 2.0, 3.0, 4.0) == [4.0, 4.0, 4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError):
        layer_weights(0, 1, 1, 1, 1)


def test_image_lr_halves_at_the_reference_milestones():
    assert image_lr(0.1, 1) == 0.1 and image_lr(0.1, 1200) == 0.1
    assert image_lr(0.1, 1201) == pytest.approx(0.05)
    assert image_lr(0.1, 1601) == pytest.approx(0.025) and image_lr(0.1, 2001) == pytest.approx(0.0125)


def test_real_statistics_in_chunks_equal_one_pass():
    record = tiny_record(num_classes=3, size=8)
    net = networks.get_network("ConvNetW32", 1, 3, (8, 8))
    images, labels = record.images_train, record.labels_train
    means, embed = real_class_statistics(net, images, labels, 3)
    with torch.no_grad():
        syn_means, syn_centers = syn_class_statistics(net, images, labels, 3)
        full_embed, maps = net.embed_with_feature_maps(images)
    assert len(means) == len(maps) == 3
    for mean, layer in zip(means, maps):
        assert torch.allclose(mean, class_means(layer, labels, 3), atol=1e-5)
    assert torch.allclose(embed, full_embed, atol=1e-5)
    assert torch.allclose(syn_centers, class_means(full_embed, labels, 3), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(means, syn_means))


def cafe(record, **overrides):
    fields = dict(init="noise", watcher_window=2, watcher_images=4, max_outer_steps=3, max_inner_steps=3)
    fields.update(overrides)
    return build_method("CAFE", record, **fields)


def test_loss_is_zero_when_synthetic_and_real_statistics_coincide():
    record = tiny_record(num_classes=3, per_class=4, size=8)
    m = cafe(record, ipc=4, batch_real=4, inner_weight=0.0)
    syn = m.init_synthetic()
    with torch.no_grad():  # the synthetic set is the whole real set, which is what every batch draws
        order = torch.argsort(record.labels_train, stable=True)
        syn.images.copy_(record.images_train[order])
    net = m.new_network()
    assert m.matching_loss(net, syn).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        syn.images.add_(0.3)
    assert m.matching_loss(net, syn).item() > 1e-3


@pytest.mark.parametrize("num_classes,size,dsa", [(3, 28, ""), (2, 32, "color_crop_cutout_flip_scale_rotate"),
                                                  (2, 28, "color_crop_cutout_flip_scale_rotate"), (3, 32, "")])
def test_cafe_runs_on_2_and_3_classes_at_28_and_32_pixels(num_classes, size, dsa):
    record = tiny_record(num_classes=num_classes, per_class=12, size=size, channel=3 if size == 32 else 1)
    m = cafe(record, dsa_strategy=dsa, model="ConvNet", ipc=1, batch_real=6, batch_train=4)
    assert m.uses_dsa == bool(dsa)
    protocol = eval_protocol(type(m), m.cfg, RunOptions())
    assert protocol.resolve(record.name, "ConvNet", "ConvNet", 1).epochs == (1000 if dsa else 600)
    syn = m.init_synthetic()
    before = syn.images.detach().clone()
    logs = m.step(syn, 1)
    assert torch.isfinite(logs["loss"]) and logs["loss"] > 0
    assert 2 <= logs["outer_steps"] <= 3
    assert not torch.equal(before, syn.images.detach())
    assert syn.images.shape == (num_classes, record.channel, size, size)


def test_steps_lower_the_loss_and_change_images():
    record = tiny_record()
    m = cafe(record, lr_img=0.1)
    syn = m.init_synthetic()
    start = syn.images.detach().clone()

    def probe_loss():
        torch.manual_seed(123)
        m.generator.manual_seed(123)
        return sum(m.matching_loss(m.new_network(), syn).item() for _ in range(3))

    before = probe_loss()
    torch.manual_seed(1)
    for iteration in range(1, 11):
        assert torch.isfinite(m.step(syn, iteration)["loss"])
    after = probe_loss()
    assert not torch.equal(syn.images.detach(), start)
    assert after < before, f"CAFE: loss {before:.4f} -> {after:.4f}"


def test_watchers_stop_by_threshold_or_bound():
    record = tiny_record()
    # lambda_1 = 0: the outer watcher can never span less, so the bound ends the loop;
    # lambda_2 = 1: the inner watcher never spans more than 1, so every inner loop runs to its bound.
    m = cafe(record, lambda_1=0.0, lambda_2=1.0, max_outer_steps=4, max_inner_steps=3)
    logs = m.step(m.init_synthetic(), 1)
    assert logs["outer_steps"] == 4 and logs["inner_epochs"] == 4 * 3
    # lambda_1 = 1: the outer loop stops as soon as the watcher is full (window 2), after one inner loop.
    m = cafe(record, lambda_1=1.0, lambda_2=1.0, max_outer_steps=50, max_inner_steps=3)
    logs = m.step(m.init_synthetic(), 1)
    assert logs["outer_steps"] == 2 and logs["inner_epochs"] == 3


def test_real_accuracy_is_mean_per_class_accuracy():
    record = tiny_record(num_classes=3, per_class=8)
    m = cafe(record, watcher_images=8)

    class Constant(torch.nn.Module):
        def forward(self, x):  # always predicts class 1
            return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3)

    assert m.real_accuracy(Constant()) == pytest.approx(1 / 3)


def test_options_reach_the_method_and_unknown_ones_fail():
    record = tiny_record()
    m = cafe(record, lambda_1=0.5)
    assert m.options.lambda_1 == 0.5 and m.options.inner_weight == 0.01
    with pytest.raises(ValueError, match="no option"):
        build_method("DM", record, lambda_1=0.5)


def test_distill_cli_resolves_cafe_options_and_warns_about_foreign_ones(capsys):
    args = distill_flags.build_parser().parse_args(["--method", "CAFE", "--dataset", "FashionMNIST", "--lambda_2", "0.05",
                                              "--task_balance", "0.1"])
    cfg, opts = distill_flags.resolve(args)
    assert cfg.extra == {"lambda_2": 0.05} and cfg.lr_img == 0.1 and cfg.iterations == 2000
    assert opts.eval_it == 100
    assert "--task_balance is not used by --method CAFE" in capsys.readouterr().err
    assert CAFE(cfg, channel=1, num_classes=10, im_size=(28, 28), sampler=None, device=torch.device("cpu"),
                generator=torch.Generator()).options.lambda_2 == 0.05


# ----- both feature methods on other networks, depths and sizes ------------------------------------
@pytest.mark.parametrize("method", ["DataDAM", "CAFE"])
@pytest.mark.parametrize("model,size,channel,classes", [
    ("ConvNetD7", 224, 3, 2),   # MHIST as the seed report runs it
    ("ConvNetD4", 64, 3, 3),    # Tiny ImageNet's image size
    ("LeNet", 32, 3, 2), ("AlexNet", 32, 3, 2), ("VGG11", 32, 3, 2), ("ResNet18", 32, 3, 2), ("MLP", 28, 1, 3),
])
def test_feature_methods_run_on_other_networks_depths_and_sizes(method, model, size, channel, classes):
    record = tiny_record(num_classes=classes, per_class=3, size=size, channel=channel)
    overrides = dict(model=model, ipc=1, batch_real=2, batch_train=2, init="real")
    if method == "CAFE":
        overrides.update(watcher_window=2, watcher_images=2, max_outer_steps=2, max_inner_steps=2)
    m = build_method(method, record, **overrides)
    syn = m.init_synthetic()
    before = syn.images.detach().clone()
    logs = m.step(syn, 1)
    assert torch.isfinite(logs["loss"]) and logs["loss"] > 0
    assert not torch.equal(before, syn.images.detach())
