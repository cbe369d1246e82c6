"""scripts/gpu_check.sh in its dry mode (CPU, generated miniature): every case runs, each is compared
with the stored dry reference (scripts/gpu_reference_dry.json, made by --make_reference the same
way), the JSON is on disk after each case, a failing case leaves the others' results and its own
log and is named by one line at the end, and a case that would pass the deadline is skipped."""
import json
import os
import subprocess

import pytest

from conftest import ROOT
from scripts import gpu_check

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def run_check(out, *args, timeout=600):
    env = {**os.environ, "DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, "--out", str(out), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def failed_lines(done):
    return [line for line in done.stdout.splitlines() if line.startswith("FAILED")]


def expected_keys(make_reference):
    return {f"{case} {variant}" for case in gpu_check.CASE_NAMES
            for variant in gpu_check.variants(case, "bf16", make_reference)}


@pytest.mark.parametrize("path,settings,dry", [(gpu_check.DRY_REFERENCE, gpu_check.DRY_SETTINGS, True),
                                               (gpu_check.REFERENCE, gpu_check.SETTINGS, False)])
def test_stored_references_cover_every_case_with_the_current_settings(path, settings, dry):
    """A case added to the check, or a changed setting, needs the reference made again."""
    stored = json.load(open(path))
    assert stored["settings"] == settings
    assert set(stored["cases"]) == expected_keys(make_reference=True)
    for case in stored["cases"].values():
        command = case["command"].split()
        assert command[:3] == ["python3", "-m", "scripts.gpu_check"] and "--make_reference" in command
        assert ("--dry" in command) == dry and "/" not in case["command"]  # no machine's folders
        assert case["acc"] is not None and 0 < case["wall_s"]


def test_dry_run_compares_every_case_with_the_stored_reference_and_names_a_failing_case(tmp_path):
    done = run_check(tmp_path, "--fail_case", "DD bf16")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    # one line for the one failure, naming the case and its log, at the end
    assert failed_lines(done) == ["FAILED DD bf16: injected failure (--fail_case DD bf16) (log: logs/DD_bf16.log)"]
    assert done.stdout.rstrip().splitlines()[-1].startswith("FAILED DD bf16")
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["dry"] and report["device"] == "cpu" and report["running"] is None
    rows = {row["case"]: row for row in report["rows"]}
    assert set(rows) == expected_keys(make_reference=False)
    assert "injected failure" in (tmp_path / "logs" / "DD_bf16.log").read_text()
    stored = json.load(open(gpu_check.DRY_REFERENCE))["cases"]
    for key, row in rows.items():
        assert (tmp_path / row["log"]).is_file(), key  # every case keeps its log
        if key == "DD bf16":
            assert row["status"] == "failed"
            continue
        assert row["status"] == "ok", row
        reference = stored[key if key.split()[1] != "bf16" else key.split()[0] + " fp32"]
        # compared with the stored file, not with a run of this process
        assert row["ref_acc"] == reference["acc"] and row["ref_loss"] == reference["loss"], key
        if key.split()[1] in ("fp32", "sequential", "stacked"):
            # Measured here: both differences 0 (same CPU, same settings). Allowed: one test image of
            # the 60 and 0.1 % of the loss, for another CPU's float32 kernels.
            assert abs(row["dacc"]) <= 100 / 60 + 1e-9, row
            assert row["dloss"] is None or abs(row["dloss"]) <= 1e-3 * abs(reference["loss"]) + 1e-6, row
    for name in ("DC", "DM", "MTT", "KIP"):
        assert rows[f"{name} fp32"]["loss"] is not None and rows[f"{name} fp32"]["acc"] is not None
    # KIP's default kernels compute in float64: --amp bf16 leaves the distillation's loss unchanged
    # and the run says so; conv_rf runs its networks in bf16 and its loss moves.
    for name in ("KIP", "KIP_nngp"):
        assert rows[f"{name} bf16"]["loss_vs_fp32"] == 0 and "float64" in rows[f"{name} bf16"]["amp_note"]
    assert rows["KIP_rf bf16"]["loss_vs_fp32"] != 0 and rows["KIP_rf bf16"]["amp_note"] is None
    assert rows["DM bf16"]["loss_vs_fp32"] != 0 and rows["DM bf16"]["amp_note"] is None
    assert rows["eval stacked"]["speedup"] > 0
    assert rows["torchrun fp32"]["processes"] == 2  # gloo, two processes on the CPU
    assert report["table"] in done.stdout and (tmp_path / "gpu_check.txt").read_text().strip() == report["table"]


def test_results_of_finished_cases_survive_a_killed_check(tmp_path):
    """The process ends abruptly when DM starts (as a time-out would end it): DC's rows are on
    disk, written after each case, and gpu_check.sh names the case that was running."""
    done = run_check(tmp_path, "--cases", "DC", "DM", "--abort_case", "DM")
    assert done.returncode == 70, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    rows = {row["case"]: row for row in report["rows"]}
    assert rows["DC fp32"]["status"] == rows["DC bf16"]["status"] == "ok"
    assert rows["DM fp32"]["status"] == "failed" and "DM bf16" not in rows
    assert "injected abort" in (tmp_path / "logs" / "DM_fp32.log").read_text()
    assert failed_lines(done) == ["FAILED DM fp32: the check process ended with exit code 70 during this case "
                                  "(log: logs/DM_fp32.log)"]


def test_a_reference_that_disagrees_fails_and_a_case_past_the_deadline_is_skipped(tmp_path):
    stored = json.load(open(gpu_check.DRY_REFERENCE))
    stored["cases"]["DC fp32"]["acc"] += 50  # a CPU value the device cannot match
    stored["cases"]["DM fp32"]["wall_s"] = 1e6  # DM would not finish before the deadline
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(stored))
    done = run_check(tmp_path / "out", "--cases", "DC", "DM", "--reference", str(reference))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lines = failed_lines(done)
    assert len(lines) == 2 and all("--acc_tol 15 points" in line for line in lines), lines
    assert lines[0].startswith("FAILED DC fp32: accuracy") and lines[1].startswith("FAILED DC bf16: accuracy")
    rows = {row["case"]: row for row in json.load(open(tmp_path / "out" / "gpu_check.json"))["rows"]}
    assert rows["DM fp32"]["status"] == rows["DM bf16"]["status"] == "skipped"
    assert "skipped (deadline): DM fp32, DM bf16" in done.stdout


def test_a_case_past_its_budget_is_stopped_and_recorded(tmp_path):
    """torchrun (two processes starting torch) cannot finish in one second: it is stopped, the
    failure names the budget, and the check still ends normally with its JSON."""
    done = run_check(tmp_path, "--cases", "torchrun", "--case_budget_s", "1")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.load(open(tmp_path / "gpu_check.json"))["rows"][0]
    assert row["case"] == "torchrun fp32" and row["status"] == "failed" and row["wall_s"] < 30
    assert failed_lines(done) == [f"FAILED torchrun fp32: {row['why']} (log: logs/torchrun_fp32.log)"]
    assert "--case_budget_s" in row["why"]


def test_make_reference_adds_cases_to_a_reference_of_the_same_settings(tmp_path):
    reference = tmp_path / "reference.json"
    for case in ("random", "herding", "eval stacked"):  # one variant of eval (its DM set is made first)
        done = run_check(tmp_path / case.replace(" ", "_"), "--make_reference", "--cases", case, "--reference",
                         str(reference))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stored = json.load(open(reference))
    assert list(stored["cases"]) == ["DM fp32", "random fp32", "herding fp32", "eval stacked"]
    assert stored["settings"] == gpu_check.DRY_SETTINGS and "/" not in stored["cases"]["random fp32"]["command"]
    # a missing reference is one failure line per case, not a crash
    done = run_check(tmp_path / "check", "--cases", "kcenter", "--reference", str(reference))
    assert done.returncode == 1 and failed_lines(done)[0].startswith("FAILED kcenter fp32: no reference value")


@pytest.mark.parametrize("argv,message", [([], "--data_path"), (["--data_path", "x"], "no CUDA device")])
def test_the_cuda_check_refuses_in_one_line_without_data_or_gpu(tmp_path, argv, message):
    if message == "no CUDA device" and __import__("torch").cuda.is_available():
        message = "--data_path x: no train-images-idx3-ubyte.gz"
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr, done.stdout + done.stderr


def test_a_python_without_the_packages_is_one_failed_setup_line_before_any_case(tmp_path):
    """A GPU machine whose python3 lacks the toolkit's packages (here: site-packages switched off)
    stops at the preflight with one ``FAILED setup`` line naming them, and runs no case."""
    import sys

    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "DEVICE": "cpu", "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path / "check")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_lines(done) == [done.stdout.splitlines()[-1]]
    assert failed_lines(done)[0].startswith("FAILED setup: python3 lacks torch,") and "yaml" in failed_lines(done)[0]
    assert not (tmp_path / "check").exists()
