"""Progress of long stages (progress.Progress): log lines without a terminal, a bar on one; the
evaluation, distillation, expert and original-model loops report through it. CPU, seconds."""
import io
import logging
import sys

import pytest
import torch

import evaluation
import methods
import progress
import storage
from methods.runner import RunOptions, run_distillation
from pretrained import experts
from pretrained import originals
from tiny_data import CPU, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "ConvNetW32"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "progress"]


def evaluate(record, progress=True, num_eval=2, epochs=2):
    cfg = evaluation.EvalConfig(epochs=epochs, batch_train=8, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    return evaluation.evaluate_synset(record.images_train, record.labels_train, MODEL, 3, record.images_test,
                                      record.labels_test, cfg, num_eval=num_eval, device=CPU, seed=4, progress=progress)


# ----- the helper -----------------------------------------------------------------------------
def test_without_a_terminal_lines_go_by_time_and_fraction_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="progress")
    with progress.Progress(10, "demo", unit="epoch", log_every_s=1e9) as shown:
        assert shown.logs  # pytest captures stderr: no terminal, no bar
        for _ in range(3):
            shown.update(1, "step x")
        assert progress_lines(caplog) == []
    (line,) = progress_lines(caplog)  # written when closed
    assert line.startswith("demo: 30% 3/10 [") and "epoch/s, step x]" in line

    caplog.clear()
    with progress.Progress(100, "fraction", log_every_s=1e9, log_fraction=0.25) as shown:
        for _ in range(100):
            shown.update()
    assert [line.split()[1] for line in progress_lines(caplog)] == ["25%", "50%", "75%", "100%"]

    caplog.clear()
    with progress.Progress(4, "every", log_every_s=0) as shown:
        for _ in range(4):
            shown.update()
    assert len(progress_lines(caplog)) == 4  # the last one at 4/4; closing adds none


def test_resumed_progress_counts_from_initial(caplog):
    caplog.set_level(logging.INFO, logger="progress")
    with progress.Progress(10, "resumed", initial=6, log_every_s=1e9) as shown:
        shown.update(2)
    assert " 8/10 " in progress_lines(caplog)[0]


def test_on_a_terminal_a_bar_is_drawn_and_console_logging_goes_around_it(caplog):
    caplog.set_level(logging.INFO, logger="progress")
    console = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(console)
    try:
        screen = FakeTerminal()
        with progress.Progress(3, "demo", unit="epoch", file=screen, log_every_s=0) as shown:
            assert not shown.logs
            assert console not in logging.root.handlers  # replaced by a tqdm.write handler
            for epoch in range(3):
                shown.update(1, f"epoch {epoch + 1}/3")
        assert console in logging.root.handlers  # and put back
        assert "demo" in screen.getvalue() and "3/3" in screen.getvalue() and "epoch 3/3" in screen.getvalue()
        assert progress_lines(caplog) == []  # a bar, no log lines
    finally:
        logging.root.removeHandler(console)


# ----- evaluation -----------------------------------------------------------------------------
def test_evaluation_logs_networks_and_epochs_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0)
    caplog.set_level(logging.INFO, logger="progress")
    evaluate(tiny_record())
    lines = progress_lines(caplog)
    assert len(lines) == 2 * 3  # 2 networks x (epochs + 1) epochs, a line each at interval 0
    assert lines[0].startswith(f"evaluation {MODEL}: 17% 1/6 [") and lines[0].endswith("network 1/2, epoch 1/3]")
    assert lines[-1].startswith(f"evaluation {MODEL}: 100% 6/6 [") and lines[-1].endswith("network 2/2, epoch 3/3]")


def test_evaluation_results_do_not_depend_on_progress(caplog, monkeypatch):
    record = tiny_record()
    state = torch.get_rng_state()
    quiet = evaluate(record, progress=False)
    assert torch.equal(state, torch.get_rng_state())
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0)
    caplog.set_level(logging.INFO, logger="progress")
    shown = evaluate(record, progress=True)
    assert progress_lines(caplog) and torch.equal(state, torch.get_rng_state())
    assert shown.accs == quiet.accs


# ----- the other long stages --------------------------------------------------------------------
def test_distillation_logs_loss_and_accuracy_without_a_terminal(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="progress")
    cfg = methods.DistillConfig(method="DC", dataset="Tiny3", model=MODEL, ipc=1, iterations=4, lr_img=0.1,
                                batch_real=8, batch_train=8, init="noise", dsa_strategy="")
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=(MODEL,), epoch_eval_train=1, run_dir=str(tmp_path),
                      save_vis=False)
    run_distillation(cfg, opts, tiny_record(), CPU)
    lines = [line for line in progress_lines(caplog) if " exp 0: " in line]
    assert lines and lines[-1].startswith("DC_Tiny3_ConvNetW32_1ipc exp 0: 100% 4/4 [")
    assert "loss=" in lines[-1] and "acc=" in lines[-1] and not lines[-1].endswith("acc=-]")
    assert any(line.startswith(f"evaluation {MODEL}: 100%") for line in progress_lines(caplog))


def test_experts_and_original_models_log_progress(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0)
    caplog.set_level(logging.INFO)
    record = tiny_record()
    cfg = experts.ExpertConfig(dataset="Tiny3", model="MLP", train_epochs=2, batch_train=16, dsa=False)
    experts.make_buffer(cfg, record, str(tmp_path / "buffer"), 2, device=CPU, test_every=0)
    lines = progress_lines(caplog)
    assert lines[-1].startswith("buffer MLP: 100% 4/4 [") and lines[-1].endswith("expert 2/2, epoch 2/2]")
    assert "expert 1 epoch 2/2" in caplog.text  # the per-epoch lines stay

    caplog.clear()
    original = originals.OriginalConfig(dataset="Tiny3", model="MLP", epochs=2, batch_size=16, lr_decay_step=(1,))
    originals.train_originals(original, record, str(tmp_path / "originals"), 1, device=CPU)
    caplog.clear()  # a second model beside the finished one: progress counts from 2 of 4 epochs
    originals.train_originals(original, record, str(tmp_path / "originals"), 2, device=CPU)
    lines = progress_lines(caplog)
    assert [line.split(": ", 1)[1].split()[1] for line in lines] == ["3/4", "4/4"]
    assert lines[-1].endswith("model 2/2, epoch 2/2]")


# ----- the heartbeat inside long iterations (progress.tick) ----------------------------------------
class StubClock:
    """progress.clock replaced: every read advances one 'second', so time is counted in clock reads
    (ticks); ``then(k, action)`` runs ``action(now)`` at the k-th read from now."""

    def __init__(self):
        self.now, self.actions = 0.0, {}

    def __call__(self):
        self.now += 1.0
        action = self.actions.pop(self.now, None)
        if action is not None:
            action(self.now)
        return self.now

    def then(self, reads, action):
        self.actions[self.now + reads] = action


class StampedLines(logging.Handler):
    """The progress lines with the stub time at which each was logged."""

    def __init__(self, clock):
        super().__init__(logging.INFO)
        self.clock, self.lines = clock, []

    def emit(self, record):
        self.lines.append((self.clock.now, record.getMessage()))


@pytest.fixture
def stub_clock(monkeypatch):
    clock = StubClock()
    monkeypatch.setattr(progress, "clock", clock)
    stamped = StampedLines(clock)
    progress.progress_logger.addHandler(stamped)
    progress.progress_logger.setLevel(logging.INFO)
    yield clock, stamped
    progress.progress_logger.removeHandler(stamped)


def test_tick_logs_inside_a_long_unit_and_stops_after_the_grace_period(stub_clock, monkeypatch):
    clock, stamped = stub_clock
    monkeypatch.setattr(progress, "HEARTBEAT_EVERY_S", 10)
    requested = []
    with progress.Progress(2, "demo", log_every_s=1e9) as shown:
        for _ in range(25):
            progress.tick()  # outside stoppable() a stop is never raised
        shown.update(1)
        with progress.stoppable(lambda: bool(requested), grace_s=5):
            for _ in range(3):
                progress.tick()
            requested.append(clock.now)
            with pytest.raises(progress.StopRequested) as stop:
                for _ in range(100):
                    progress.tick()
    assert 5 <= clock.now - requested[0] <= 5 + progress.POLL_S + 1 and stop.value.waited_s == 5
    inside = [(at, line) for at, line in stamped.lines if "running for" in line]
    assert [line.split(" (")[-1] for _, line in inside[:2]] == ["it 1 running for 00:10)", "it 1 running for 00:20)"]
    assert inside[0][1].startswith("demo: 0% 0/2 [")
    assert progress.tick() is None  # the check is gone with the block


def test_a_long_cafe_iteration_logs_progress_inside_it(stub_clock, monkeypatch, tmp_path):
    clock, stamped = stub_clock
    monkeypatch.setattr(progress, "HEARTBEAT_EVERY_S", 3)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1e9)  # only the heartbeat, the 5 % steps and the end
    cfg = methods.DistillConfig(method="CAFE", dataset="Tiny3", model=MODEL, ipc=1, iterations=2, lr_img=0.1,
                                batch_real=8, batch_train=8, init="noise", dsa_strategy="",
                                extra=dict(watcher_window=2, watcher_images=4, max_outer_steps=3, max_inner_steps=3))
    opts = RunOptions(num_exp=1, num_eval=0, eval_models=(MODEL,), run_dir=str(tmp_path), save_vis=False)
    ends = []
    run_distillation(cfg, opts, tiny_record(), CPU, on_iteration=lambda exp, it, logs: ends.append(clock.now))
    lines = [(at, line) for at, line in stamped.lines if " exp 0: " in line]
    for iteration, end in enumerate(ends, start=1):
        start = ends[iteration - 2] if iteration > 1 else 0
        inside = [at for at, line in lines if start < at < end and f"(it {iteration} running for " in line]
        assert len(inside) >= 2, (iteration, lines)  # lines while the iteration runs, not only after it
    stamps = [at for at, _ in lines]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= progress.HEARTBEAT_EVERY_S


def test_a_stop_inside_an_iteration_keeps_the_last_checkpoint_and_resumes_bit_exactly(stub_clock, monkeypatch,
                                                                                        tmp_path):
    from dataclasses import replace

    from methods.runner import RunInterrupted, StopFlag
    from sets import files

    clock, _ = stub_clock
    monkeypatch.setattr(progress, "STOP_GRACE_S", 4)
    record = tiny_record()
    cfg = methods.DistillConfig(method="DC", dataset="Tiny3", model=MODEL, ipc=1, iterations=4, lr_img=0.1,
                                batch_real=8, batch_train=8, init="noise", dsa_strategy="", outer_loop=3, inner_loop=2)
    opts = RunOptions(num_exp=1, num_eval=1, eval_models=(MODEL,), epoch_eval_train=1, run_dir=str(tmp_path / "full"),
                      save_vis=False, checkpoint_every=2)
    full = run_distillation(cfg, opts, record, CPU)

    stop, seen, kept = StopFlag(), [], {}
    checkpoint = tmp_path / "cut" / "last.pt"

    def request(now):  # what the SIGTERM handler does, three clock reads into iteration 3
        stop.requested = True
        seen.append(now)
        kept["bytes"] = checkpoint.read_bytes()

    def arm(exp, iteration, logs):
        seen.append(("done", iteration))
        if iteration == 2:
            clock.then(3, request)  # after iteration 2's progress line and its checkpoint

    cut = replace(opts, run_dir=str(tmp_path / "cut"))
    with pytest.raises(RunInterrupted, match=r"stopped inside experiment 0, iteration 3 .*the unfinished iteration is "
                                             r"dropped\); checkpoint .*last.pt \(experiment 0, iteration 2\) is kept"):
        run_distillation(cfg, cut, record, CPU, stop=stop, on_iteration=arm)
    assert seen[:2] == [("done", 1), ("done", 2)] and ("done", 3) not in seen  # iteration 3 never ended
    requested_at = seen[2]
    assert clock.now - requested_at <= progress.STOP_GRACE_S + progress.POLL_S + 3  # within the bound (+ closing line)
    assert checkpoint.read_bytes() == kept["bytes"]  # the last checkpoint, untouched
    saved = storage.load_checkpoint(str(checkpoint))
    assert (saved["exp"], saved["iteration"], saved["pending_eval"]) == (0, 2, False)

    monkeypatch.setattr(progress, "clock", __import__("time").monotonic)
    resumed = run_distillation(cfg, replace(cut, resume=True), record, CPU)
    assert torch.equal(files.load_results(full.result_path)["data"][0][0],
                       files.load_results(resumed.result_path)["data"][0][0])
    assert full.accs_all_exps == resumed.accs_all_exps


def test_experts_and_original_models_log_inside_long_epochs(stub_clock, monkeypatch, tmp_path):
    clock, stamped = stub_clock
    monkeypatch.setattr(progress, "HEARTBEAT_EVERY_S", 5)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1e9)
    record = tiny_record()  # 72 training images: 18 batches of 4 per epoch, a tick each
    cfg = experts.ExpertConfig(dataset="Tiny3", model="MLP", train_epochs=1, batch_train=4, dsa=False)
    experts.make_buffer(cfg, record, str(tmp_path / "buffer"), 1, device=CPU, test_every=0)
    original = originals.OriginalConfig(dataset="Tiny3", model="MLP", epochs=1, batch_size=4, lr_decay_step=(1,))
    originals.train_originals(original, record, str(tmp_path / "originals"), 1, device=CPU)
    inside = [line for _, line in stamped.lines if "(epoch 1 running for " in line]
    assert sum(line.startswith("buffer MLP: 0% 0/1 [") for line in inside) >= 2
    assert sum(line.startswith("original MLP models: 0% 0/1 [") for line in inside) >= 2
