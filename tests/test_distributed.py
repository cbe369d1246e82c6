"""Several processes (torchrun's layout, gloo on CPU) give one process's results.

Two ranks are spawned with ``torch.multiprocessing`` (the environment torchrun would set, one
thread each); one job runs every scenario so that the processes start once. Each test then
compares a scenario with the same call in this (single) process: DM, DC and DC-with-BatchNorm
images (classes sharded, image gradients summed), an evaluation of 4 networks (networks sharded),
a 2-expert buffer and 2 original models (units sharded); a SIGTERM to one rank during a
2-process DM run resumes to the uninterrupted run's images bit for bit; ``--ddp`` keeps the
replicas of one model equal.
"""
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

import distributed
import evaluation
import utils
from methods.runner import DistillationRun, RunInterrupted, RunOptions, StopFlag, run_distillation
from pretrained import buffers, experts, original_files, originals
from sets import files
from tiny_data import tiny_record

CPU = torch.device("cpu")
WORLD = 2
MODEL = "ConvNetW32"
JOB_TIMEOUT_S = 400  # a busy 2-core machine starts two torch processes slowly
RECORD = dict(num_classes=4, per_class=16, size=8)
# Distillations whose classes are sharded: DM, DC, and DC with BatchNorm (frozen while matching).
SHARDED = {"DM": ("DM", MODEL), "DC": ("DC", MODEL), "DC_BN": ("DC", "ConvNetBN")}


def distill_setup(method, run_dir, model=MODEL, **run):
    """The distillation of a scenario: tiny data, 4 classes (2 per rank), ipc 2, 3 iterations."""
    import methods

    init = "real" if method == "DM" else "noise"
    cfg = methods.DistillConfig(method=method, dataset="Tiny3", model=model, ipc=2, iterations=3,
                                lr_img=1.0 if method == "DM" else 0.1, batch_real=8, batch_train=8, init=init,
                                dsa_strategy="color_crop_cutout_flip_scale_rotate" if method == "DM" else "")
    opts = RunOptions(**{**dict(num_exp=1, num_eval=0, eval_it=0, eval_models=(MODEL,), seed=5, run_dir=run_dir,
                                checkpoint_every=0, save_vis=False), **run})
    return cfg, opts


def evaluate_tiny(record):
    """4 networks of the evaluation protocol on a fixed set (2 epochs)."""
    g = utils.make_generator(1)
    images = torch.randn(record.num_classes * 2, 1, 8, 8, generator=g)
    labels = torch.arange(record.num_classes).repeat_interleave(2)
    cfg = evaluation.EvalConfig(epochs=2, lr=0.01, batch_train=8)
    return evaluation.evaluate_synset_sharded(images, labels, MODEL, record.num_classes, record.images_test,
                                         record.labels_test, cfg, num_eval=4, device=CPU, seed=7, progress=False)


def make_buffer(record, root):
    cfg = experts.ExpertConfig(dataset=record.name, model=MODEL, train_epochs=2, batch_train=8, dsa=False,
                               lr_teacher=0.05)
    directory = buffers.buffer_dir(str(root), record.name, MODEL, False)
    experts.make_buffer(cfg, record, directory, 2, device=CPU, test_every=0, save_interval=1)
    return directory


def make_originals(record, root):
    cfg = originals.OriginalConfig(dataset="Tiny3", model=MODEL, epochs=2, batch_size=8, lr_decay_step=(5,))
    return originals.train_originals(cfg, record, str(root), 2, device=CPU, save_every=0)


def scenarios(rank, out):
    """Every scenario on this rank; rank 0 saves what the tests compare."""
    record = tiny_record(**RECORD)
    found = {}
    for name, (method, model) in SHARDED.items():
        run = DistillationRun(*distill_setup(method, os.path.join(out, name), model), record, CPU)
        outcome = run.run()
        found[name] = files.load_results(outcome.result_path)["data"][0][0] if rank == 0 else None
        found[f"{name} classes"] = distributed.gather_objects(run.method.owned_classes())
    found["eval"] = evaluate_tiny(record).accs
    found["buffer"] = make_buffer(record, os.path.join(out, "buffers"))
    found["originals"] = [r.test_acc for r in make_originals(record, os.path.join(out, "originals")).results]
    # --ddp: both ranks train one model; each rank's replica, the initial and the written weights.
    cfg = originals.OriginalConfig(dataset="Tiny3", model=MODEL, epochs=2, batch_size=8, lr_decay_step=(5,))
    net = original_files.build_network(MODEL, record.channel, record.num_classes, record.im_size, CPU, 0)
    start = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    path = os.path.join(out, "ddp", "checkpoint.pt")
    originals.train_original(net, record, cfg, path, save_every=0, data_parallel=True)
    replica = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    found["ddp"] = {"replicas": distributed.gather_objects(replica), "start": start,
                    "written": original_files.read_checkpoint(path)["state_dict"]}
    if rank == 0:
        torch.save(found, os.path.join(out, "found.pt"))


def interrupted(rank, out):
    """A 2-process DM run: SIGTERM to rank 1 after iteration 2, then the same run resumed."""
    record = tiny_record(**RECORD)
    stop = StopFlag().install()
    run_dir = os.path.join(out, "cut")

    def terminate(exp, iteration, logs):
        if rank == 1 and iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(RunInterrupted, match="iteration 2"):
            run_distillation(*distill_setup("DM", run_dir), record, CPU, stop=stop, on_iteration=terminate)
    finally:
        stop.restore()
    outcome = run_distillation(*distill_setup("DM", run_dir, resume=True), record, CPU)
    if rank == 0:
        torch.save(files.load_results(outcome.result_path)["data"][0][0], os.path.join(out, "resumed.pt"))


def _entry(rank, port, job, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(CPU, timeout_s=JOB_TIMEOUT_S)
    try:
        job(rank, out)
    finally:
        distributed.shutdown()


def launch(job, out):
    """Run ``job(rank, out)`` on 2 spawned ranks joined by gloo; fail on a non-zero exit or timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(rank, port, job, str(out))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOB_TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * WORLD


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The output folder of :func:`scenarios` run on 2 ranks, and what rank 0 saved."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch(scenarios, out)
    return out, torch.load(out / "found.pt")


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_classes_give_one_process_images(two_ranks, tmp_path, one_thread, name):
    out, found = two_ranks
    method, model = SHARDED[name]
    outcome = run_distillation(*distill_setup(method, str(tmp_path / name), model), tiny_record(**RECORD), CPU)
    alone = files.load_results(outcome.result_path)["data"][0][0]
    assert found[f"{name} classes"] == [[0, 2], [1, 3]]  # each rank computed its own classes
    assert torch.allclose(found[name], alone, atol=1e-5, rtol=0)


def test_sharded_evaluation_gives_one_process_accuracies(two_ranks, one_thread):
    _, found = two_ranks
    assert len(found["eval"]) == 4
    assert found["eval"] == evaluate_tiny(tiny_record(**RECORD)).accs


def test_sharded_buffer_equals_one_process(two_ranks, tmp_path, one_thread):
    _, found = two_ranks
    alone = make_buffer(tiny_record(**RECORD), tmp_path)
    split, single = buffers.load_buffer(found["buffer"]), buffers.load_buffer(alone)
    assert len(split) == len(single) == 2
    for a, b in zip(split, single):
        for snap_a, snap_b in zip(a, b):
            assert all(torch.equal(x, y) for x, y in zip(snap_a, snap_b))
    manifest = buffers.read_manifest(found["buffer"])
    assert manifest["num_experts"] == 2 and [e["index"] for e in manifest["experts"]] == [0, 1]


def test_sharded_originals_equal_one_process(two_ranks, tmp_path, one_thread):
    out, found = two_ranks
    alone = make_originals(tiny_record(**RECORD), tmp_path)
    assert found["originals"] == [r.test_acc for r in alone.results]
    for index in range(2):
        split = original_files.read_checkpoint(original_files.checkpoint_path(str(out / "originals"), "Tiny3", MODEL, index))
        single = original_files.read_checkpoint(original_files.checkpoint_path(str(tmp_path), "Tiny3", MODEL, index))
        assert all(torch.equal(split["state_dict"][k], single["state_dict"][k]) for k in single["state_dict"])


def test_sigterm_on_one_rank_resumes_bit_exactly(two_ranks, tmp_path):
    _, found = two_ranks
    launch(interrupted, tmp_path)
    assert torch.equal(torch.load(tmp_path / "resumed.pt"), found["DM"])


def test_shard_covers_every_unit_once():
    for world in (1, 2, 3, 5):
        for mode in distributed.SHARD_MODES:
            parts = [distributed.shard(7, mode, of=world, at=r) for r in range(world)]
            assert sorted(i for part in parts for i in part) == list(range(7))
    assert distributed.shard(5, "blocks", of=2, at=0) == [0, 1, 2]
    assert distributed.shard(5, of=2, at=1) == [1, 3]
    assert distributed.world_size() == 1 and distributed.is_main()  # no torchrun here


def test_ddp_trains_one_model_together(two_ranks):
    """--ddp: both ranks train one model (DistributedDataParallel over DistributedSampler shares):
    the replicas stay equal although each saw other images, the model moved, rank 0 wrote it."""
    _, found = two_ranks
    ddp = found["ddp"]
    first, second = ddp["replicas"]
    assert torch.equal(first, second)
    assert not torch.equal(first, ddp["start"])
    written = torch.cat([t.reshape(-1) for k, t in ddp["written"].items() if "running" not in k
                         and "num_batches" not in k])
    assert written.numel() == first.numel() and torch.equal(written, first)


@pytest.mark.parametrize("method", ["DM", "DataDAM"])
def test_class_shares_sum_to_the_whole_gradient(method, one_thread):
    """In one process: the image gradients of the loss over classes {0, 2} and over {1, 3} (what two
    ranks compute, each drawing the whole real-batch stream) add up to the gradient over all classes."""
    from tiny_data import build_method

    record = tiny_record(**RECORD)
    grads = []
    for classes in (None, [0, 2], [1, 3]):
        m = build_method(method, record, init="real", model=MODEL)  # seeds the global RNG and the generator
        m._owned_known, m._owned_classes = True, classes
        syn = m.init_synthetic()
        m.loss(syn).backward()
        grads.append(syn.images.grad.clone())
    whole, first, second = grads
    assert first.abs().sum() > 0 and second.abs().sum() > 0
    assert torch.allclose(first + second, whole, atol=1e-6, rtol=1e-5)
    assert torch.all(first[2:4] == 0) and torch.all(second[:2] == 0)  # ipc 2: rank 0 leaves class 1 alone
