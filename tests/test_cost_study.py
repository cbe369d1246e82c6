"""scripts/cost_study.py: the training-cost study (seconds of the loss and of an iteration, peak
memory, as ipc grows) on generated miniatures: outputs, the time bound, skipped methods, one-line
errors, every registered method, and the loss timer."""
import csv
import json
import time

import pytest

import methods
from scripts import cost_case, cost_study

TINY = ["--image_shape", "3", "8", "8", "--num_classes", "2", "--real_per_class", "16", "--model", "ConvNetW32",
        "--threads", "1"]


def study(tmp_path, *args):
    """Run the study in-process on the tiny shape; returns (exit code, the JSON report)."""
    code = cost_study.main([*TINY, "--out", str(tmp_path), *args])
    return code, json.loads((tmp_path / "cost_study.json").read_text())


def test_tiny_study_writes_table_json_csv_and_figures(tmp_path, capsys, one_thread):
    code, report = study(tmp_path, "--methods", "DM", "DC", "--ipc", "1", "2", "--iterations", "1", "--no-isolate")
    assert code == 0
    rows = report["rows"]
    assert [(row["method"], row["ipc"], row["status"]) for row in rows] == [
        ("DM", 1, "ok"), ("DM", 2, "ok"), ("DC", 1, "ok"), ("DC", 2, "ok")]
    for row in rows:
        assert row["loss_s"] > 0 and row["iteration_s"] > 0 and row["peak_mb"] > 0 and row["graph_mb"] > 0
        assert row["updates"] == 1 and row["timed"] == 1
        # the loss is part of the iteration (timer overhead aside)
        assert row["loss_s"] * row["updates"] <= row["iteration_s"] * 1.05 + 1e-3
    with open(tmp_path / "cost_study.csv") as handle:
        assert [line["method"] for line in csv.DictReader(handle)] == ["DM", "DM", "DC", "DC"]
    markdown = (tmp_path / "cost_study.md").read_text()
    assert "| DC " in markdown and "loss s" in markdown
    for name in ("time_vs_ipc.png", "memory_vs_ipc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "DC ipc 2:" in printed and "iteration s" in printed
    (tmp_path / "time_vs_ipc.png").unlink()
    assert cost_study.main(["--replot", "--out", str(tmp_path)]) == 0  # the outputs again, from the JSON
    assert (tmp_path / "cost_study.md").read_text() == markdown and (tmp_path / "time_vs_ipc.png").is_file()


def test_status_cell_shortens_allocation_failures():
    row = {"status": "out of memory", "note": "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                               "2621440000 bytes. Error code 12 (Cannot allocate memory)"}
    assert cost_study.short_status(row) == "out of memory (allocating 2500 MiB more failed)"
    cuda = {"status": "out of memory", "note": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; ...)"}
    assert cost_study.short_status(cuda) == "out of memory (allocating 2048 MiB more failed)"
    assert cost_study.short_status({"status": "ok", "note": ""}) == "ok"


def test_isolated_case_reports_its_own_process_peak(tmp_path):
    code, report = study(tmp_path, "--methods", "DM", "--ipc", "1", "--iterations", "0", "--device", "cpu")
    assert code == 0
    (row,) = report["rows"]
    assert row["status"] == "ok", row
    assert "ru_maxrss" in row["memory_measure"] and "cumulative" not in row["memory_measure"]
    assert row["peak_mb"] >= row["base_mb"] > 0 and row["graph_mb"] > 0
    assert report["memory_limit_mb"] > 0 and report["machine"]["threads"] == 1


def test_series_stops_at_the_time_bound(tmp_path, one_thread):
    code, report = study(tmp_path, "--methods", "DM", "--ipc", "1", "2", "4", "--time_bound", "1e-9", "--no-isolate")
    assert code == 0
    (row,) = report["rows"]  # ipc 2 and 4 are not run
    assert row["ipc"] == 1 and row["status"] == "over time bound"
    assert row["timed"] == 1 and "warm-up alone" in row["note"] and row["iteration_s"] > 0


def test_a_method_the_study_cannot_time_is_skipped_with_a_note(tmp_path, capsys, one_thread):
    code, report = study(tmp_path, "--methods", "random", "DM", "--ipc", "1", "--iterations", "0", "--no-isolate")
    assert code == 0
    assert [row["method"] for row in report["rows"]] == ["DM"]
    notes = {entry["method"]: entry["note"] for entry in report["skipped"]}
    assert "selection baseline" in notes["random"]
    assert "random: a selection baseline" in capsys.readouterr().out


@pytest.mark.parametrize("names,needle", [
    (["FOO"], "--methods FOO: not a registered method; known: "),
    (["DM", "NoSuchMethod"], "--methods NoSuchMethod: not a registered method; known: "),
    (["random"], "--methods random: nothing to measure (random: a selection baseline"),
])
def test_an_unknown_method_or_nothing_to_measure_is_one_line(names, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cost_study.main([*TINY, "--out", str(tmp_path), "--methods", *names, "--ipc", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    if "known" in needle:
        assert "DM, " in err[0] and err[0].endswith("(or all)"), err
    assert not (tmp_path / "cost_study.json").exists()


def test_all_runs_every_registered_distillation_method(tmp_path, one_thread):
    code, report = study(tmp_path, "--methods", "all", "--ipc", "1", "--iterations", "0", "--no-isolate")
    assert code == 0
    expected = [name for name in methods.list_methods() if not methods.get_method_class(name).selection_only
                and not methods.get_method_class(name).needs_teacher
                and not methods.get_method_class(name).needs_pretrained]
    assert "NCFM" not in expected  # its pool of train_original.py models is not trained by the study
    assert [row["method"] for row in report["rows"]] == expected
    for row in report["rows"]:
        assert row["status"] == "ok" and row["loss_s"] > 0, row
        assert "loss_functions not called" not in row["note"], row
    trajectory = {row["method"]: row for row in report["rows"]}["MTT"]
    assert trajectory["loss_s"] <= trajectory["iteration_s"] * 1.05 + 1e-3


@pytest.mark.parametrize("args,needle", [
    (["--ipc", "0"], "--ipc"),
    (["--ipc", "ten"], "--ipc"),
    (["--time_bound", "0"], "--time_bound"),
    (["--iterations", "-1"], "--iterations"),
    (["--no_such_flag"], "--no_such_flag"),
    (["--device", "tpu"], "--device"),
    (["--replot"], "--replot"),
])
def test_bad_flag_is_a_one_line_error(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cost_study.main([*args, "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_every_method_names_loss_functions_it_has():
    for name in methods.list_methods():
        cls = methods.get_method_class(name)
        for function in cls.loss_functions:
            assert callable(getattr(cls, function, None)), (name, function)


def test_loss_timer_times_the_loss_and_update_but_not_the_rest():
    class Method:
        loss_functions = ("loss",)

        def loss(self):
            time.sleep(0.05)
            return 1.0

        def update_images(self, loss):
            time.sleep(0.02)

        def step(self):
            time.sleep(0.3)  # inner network training: not the loss
            self.update_images(self.loss())

    import torch

    method = Method()
    timer = cost_case.LossTimer(method, torch.device("cpu"))
    method.step()
    assert timer.updates == 1 and timer.loss_calls == 1
    assert 0.07 <= timer.seconds < 0.3

    class Wrong(Method):
        loss_functions = ("no_such_function",)

    with pytest.raises(ValueError, match="no_such_function"):
        cost_case.LossTimer(Wrong(), torch.device("cpu"))
