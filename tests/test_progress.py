"""Progress of long stages (utils.Progress): log lines without a terminal, a bar on one; the
evaluation, distillation, expert and original-model loops report through it. CPU, seconds."""
import io
import logging
import sys

import pytest
import torch

import methods
import evaluation
import utils
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
    return [r.getMessage() for r in caplog.records if r.name == "utils.progress"]


def evaluate(record, progress=True, num_eval=2, epochs=2):
    cfg = evaluation.EvalConfig(epochs=epochs, batch_train=8, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    return evaluation.evaluate_synset(record.images_train, record.labels_train, MODEL, 3, record.images_test,
                                 record.labels_test, cfg, num_eval=num_eval, device=CPU, seed=4, progress=progress)


# ----- the helper -----------------------------------------------------------------------------
def test_without_a_terminal_lines_go_by_time_and_fraction_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="utils.progress")
    with utils.Progress(10, "demo", unit="epoch", log_every_s=1e9) as progress:
        assert progress.logs  # pytest captures stderr: no terminal, no bar
        for _ in range(3):
            progress.update(1, "step x")
        assert progress_lines(caplog) == []
    (line,) = progress_lines(caplog)  # written when closed
    assert line.startswith("demo: 30% 3/10 [") and "epoch/s, step x]" in line

    caplog.clear()
    with utils.Progress(100, "fraction", log_every_s=1e9, log_fraction=0.25) as progress:
        for _ in range(100):
            progress.update()
    assert [line.split()[1] for line in progress_lines(caplog)] == ["25%", "50%", "75%", "100%"]

    caplog.clear()
    with utils.Progress(4, "every", log_every_s=0) as progress:
        for _ in range(4):
            progress.update()
    assert len(progress_lines(caplog)) == 4  # the last one at 4/4; closing adds none


def test_resumed_progress_counts_from_initial(caplog):
    caplog.set_level(logging.INFO, logger="utils.progress")
    with utils.Progress(10, "resumed", initial=6, log_every_s=1e9) as progress:
        progress.update(2)
    assert " 8/10 " in progress_lines(caplog)[0]


def test_on_a_terminal_a_bar_is_drawn_and_console_logging_goes_around_it(caplog):
    caplog.set_level(logging.INFO, logger="utils.progress")
    console = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(console)
    try:
        screen = FakeTerminal()
        with utils.Progress(3, "demo", unit="epoch", file=screen, log_every_s=0) as progress:
            assert not progress.logs
            assert console not in logging.root.handlers  # replaced by a tqdm.write handler
            for epoch in range(3):
                progress.update(1, f"epoch {epoch + 1}/3")
        assert console in logging.root.handlers  # and put back
        assert "demo" in screen.getvalue() and "3/3" in screen.getvalue() and "epoch 3/3" in screen.getvalue()
        assert progress_lines(caplog) == []  # a bar, no log lines
    finally:
        logging.root.removeHandler(console)


# ----- evaluation -----------------------------------------------------------------------------
def test_evaluation_logs_networks_and_epochs_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0)
    caplog.set_level(logging.INFO, logger="utils.progress")
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
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0)
    caplog.set_level(logging.INFO, logger="utils.progress")
    shown = evaluate(record, progress=True)
    assert progress_lines(caplog) and torch.equal(state, torch.get_rng_state())
    assert shown.accs == quiet.accs


# ----- the other long stages --------------------------------------------------------------------
def test_distillation_logs_loss_and_accuracy_without_a_terminal(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="utils.progress")
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
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0)
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
