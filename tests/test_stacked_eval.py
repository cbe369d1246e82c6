"""Stacked evaluation (``evaluation.stacked``, ``--stacked_eval``): N networks trained together give what N
networks trained one after another give, with each network's own initialisation, data order and
augmentation draws."""
import copy

import pytest
import torch
import torch.nn as nn

import augment
import networks
import evaluation
from evaluation import stacked as stacking
import utils
from tiny_data import CPU, tiny_record

DSA = "color_crop_cutout_flip_scale_rotate"
DC_AUG = augment.DCAugParam(strategy="crop_scale_rotate_noise")


def _fresh(model, seed, count, record):
    nets = []
    for k in range(count):
        torch.manual_seed(seed + k)
        nets.append(networks.get_network(model, record.channel, record.num_classes, record.im_size))
    return nets


def _labels(record, soft):
    if not soft:
        return record.labels_train
    logits = torch.randn(len(record.labels_train), record.num_classes, generator=torch.Generator().manual_seed(3))
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("model,dsa,dc_aug,soft", [
    ("ConvNetW32", DSA, None, False),     # instance norm, DiffAugment
    ("ConvNetW32", "", DC_AUG, True),     # DC augmentation, soft labels
    ("ConvNetBN", "", DC_AUG, False),     # BatchNorm (batch statistics, running statistics)
    ("ConvNetBN", DSA, None, True),
])
def test_stacked_training_equals_one_network_at_a_time(one_thread, model, dsa, dc_aug, soft):
    record = tiny_record(per_class=10)  # 30 images, batches of 8: the last one is smaller
    labels = _labels(record, soft)
    nets = _fresh(model, 11, 3, record)
    copies = [copy.deepcopy(net) for net in nets]
    augmenter = evaluation.make_augmenter(dsa, dc_aug)
    for k, net in enumerate(nets):
        generator = utils.make_generator(40 + k)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            evaluation.train_epoch(net, record.images_train, labels, optimizer, 8, generator, augmenter)
    stack = stacking.StackedNetworks(copies)
    generators = [utils.make_generator(40 + k) for k in range(3)]
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        stacking.train_epoch(stack, record.images_train, labels, optimizer, 8, generators, dsa, dc_aug)
    for k, net in enumerate(nets):
        trained = stack.network(k)
        for (name, value), (_, expected) in zip(trained.state_dict().items(), net.state_dict().items()):
            assert torch.allclose(value.float(), expected.float(), rtol=1e-4, atol=1e-5), (k, name)
        # the generators were drawn from exactly as far as one network's own
        assert torch.equal(torch.rand(4, generator=generators[k]),
                           torch.rand(4, generator=_advanced(40 + k, record, labels, dsa, dc_aug)))


def _advanced(seed, record, labels, dsa, dc_aug):
    """A generator taken through two epochs of evaluation.train_epoch's draws (untrained network)."""
    generator = utils.make_generator(seed)
    net = networks.get_network("ConvNetW32", record.channel, record.num_classes, record.im_size)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for _ in range(2):
        evaluation.train_epoch(net, record.images_train, labels, optimizer, 8, generator, evaluation.make_augmenter(dsa, dc_aug))
    return generator


@pytest.mark.parametrize("dsa,dc_aug", [(DSA, None), ("", DC_AUG), ("crop", None)])
def test_augmentation_draws_are_each_networks_own(dsa, dc_aug):
    x = torch.randn(4, 6, 2, 9, 9)
    joined = stacking.augment_stacked(x, [torch.Generator().manual_seed(k) for k in range(4)], dsa, dc_aug)
    augmenter = evaluation.make_augmenter(dsa, dc_aug)
    for k in range(4):
        assert torch.allclose(joined[k], augmenter(x[k], torch.Generator().manual_seed(k)), atol=1e-6)


def test_test_pass_of_many_networks_at_once(one_thread):
    record = tiny_record(per_class=4)
    nets = _fresh("ConvNetW32", 0, 3, record)
    test_x = torch.randn(10_000, record.channel, *record.im_size, generator=torch.Generator().manual_seed(1))
    test_y = torch.randint(0, record.num_classes, (10_000,), generator=torch.Generator().manual_seed(2))
    stack = stacking.StackedNetworks(copy.deepcopy(nets))
    accs = stacking.test_accuracies(stack, test_x, test_y, batch_size=5000)
    assert accs == [evaluation.test_accuracy(net, test_x, test_y) for net in nets] and len(set(accs)) > 1
    tta = stacking.test_accuracies(stack, test_x[:1000], test_y[:1000], batch_size=1000, tta_mode="hflip")
    assert tta == [evaluation.test_accuracy(net, test_x[:1000], test_y[:1000], tta_mode="hflip") for net in nets]


def test_evaluate_synset_stacked_equals_sequential_and_records_the_path(one_thread):
    record = tiny_record(per_class=8, separable=False)  # accuracies differ from network to network
    cfg = evaluation.EvalConfig(epochs=3, batch_train=8, dsa_strategy=DSA)
    state = torch.get_rng_state()
    results = {mode: evaluation.evaluate_synset(record.images_train, record.labels_train, "ConvNetW32", 3,
                                           record.images_test, record.labels_test,
                                           evaluation.EvalConfig(**{**cfg.__dict__, "stacked_eval": mode}),
                                           num_eval=4, device=CPU, seed=7, progress=False)
               for mode in ("off", "on")}
    assert torch.equal(state, torch.get_rng_state())
    assert results["on"].accs == results["off"].accs and len(set(results["off"].accs)) > 1
    assert results["on"].path == "stacked" and results["off"].path == "sequential"
    assert results["on"].as_dict()["eval_path"] == "stacked"
    # a share of the networks (another rank's, say): each index keeps its own seed
    share = evaluation.evaluate_synset(record.images_train, record.labels_train, "ConvNetW32", 3, record.images_test,
                                  record.labels_test, evaluation.EvalConfig(**{**cfg.__dict__, "stacked_eval": "on"}),
                                  device=CPU, seed=7, progress=False, indices=[3, 1])
    assert share.accs == [results["off"].accs[3], results["off"].accs[1]]


class _DataDependent(networks.BaseNetwork):
    """A network whose forward reads a value (``.item()``), which vmap cannot batch."""

    def __init__(self, channel, num_classes, im_size):
        super().__init__()
        self.conv = nn.Conv2d(channel, 4, 3, padding=1)
        self.classifier = nn.Linear(4 * im_size[0] * im_size[1], num_classes)

    def _features(self, x, maps):
        out = self.conv(x)
        if out.abs().max().item() > 1e6:
            out = out / 2
        return out.flatten(1)


def test_unsupported_architecture_falls_back_to_sequential(monkeypatch, one_thread):
    monkeypatch.setitem(networks.NETWORKS, "DataDependentNet", _DataDependent)
    record = tiny_record(per_class=4)
    cfg = evaluation.EvalConfig(epochs=1, batch_train=8, stacked_eval="on")
    result = evaluation.evaluate_synset(record.images_train, record.labels_train, "DataDependentNet", 3,
                                   record.images_test, record.labels_test, cfg, num_eval=2, device=CPU, progress=False)
    assert result.path == "sequential" and "cannot be stacked" in result.path_note and len(result.accs) == 2
    assert "cannot be stacked" in result.as_dict()["eval_path_note"]


def test_auto_choice():
    cuda = torch.device("cuda")
    assert evaluation.eval_path("auto", "ConvNet", cuda, 5) == (True, "auto: stacked")
    assert evaluation.eval_path("auto", "ResNet18", cuda, 5)[0] is False
    assert evaluation.eval_path("auto", "ConvNet", CPU, 5)[0] is False
    assert evaluation.eval_path("on", "ConvNet", CPU, 5) == (True, "")
    assert evaluation.eval_path("on", "ConvNet", CPU, 1)[0] is False
    assert evaluation.eval_path("off", "ConvNet", cuda, 5) == (False, "")
    assert "training term" in evaluation.eval_path("on", "ConvNet", cuda, 5, term=object())[1]
    assert "--label_loss mse" in evaluation.eval_path("on", "ConvNet", cuda, 5, label_loss="mse")[1]
    with pytest.raises(ValueError, match="--stacked_eval"):
        evaluation.EvalConfig(stacked_eval="sometimes")


def test_flag_reaches_the_protocol_of_both_stages():
    from cli import distill_flags, evaluate_flags
    from methods.runner import eval_protocol
    import methods

    for given, expected in (([], "auto"), (["--stacked_eval", "off"], "off"), (["--stacked_eval", "on"], "on")):
        cfg, opts = distill_flags.resolve(distill_flags.parse_args(["--method", "DM", "--dataset", "MNIST", *given]))
        protocol = eval_protocol(methods.get_method_class("DM"), cfg, opts)
        assert opts.stacked_eval == protocol.stacked_eval == expected
        assert protocol.resolve("MNIST", "ConvNet", "ConvNet", 1).stacked_eval == expected
        args = evaluate_flags.build_parser().parse_args(["--baseline", "random", "--ipc", "1", *given])
        saved = evaluation.EvalProtocol(stacked_eval="off")  # how, not what, is trained: the flag decides
        assert evaluate_flags.apply_flags(saved, args).stacked_eval == expected
    with pytest.raises(SystemExit):
        distill_flags.parse_args(["--stacked_eval", "sometimes"])


def test_evaluate_py_rows_record_the_path(one_thread):
    from sets import comparison

    record = tiny_record(per_class=4)
    row = comparison.Row(name="set", kind="synthetic", ipc=4, method="DM", dataset=record.name)
    experiment = comparison.SetToEvaluate(images=record.images_train, labels=record.labels_train)
    protocol = evaluation.EvalProtocol(epochs_plain=1, batch_train=8, stacked_eval="on")
    comparison.evaluate_set_row(row, [experiment], ["ConvNetW32"], protocol, "ConvNet", record.images_test,
                                record.labels_test, 3, num_eval=2, device=CPU, seed=0)
    assert row.results["ConvNetW32"]["eval_path"] == "stacked" and len(row.results["ConvNetW32"]["accs"]) == 2
