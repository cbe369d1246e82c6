"""scripts/gpu_check.sh in its dry mode (CPU, generated miniature, one iteration): every case runs
in fp32 and bf16 through the stage scripts, the table and the JSON cover them, and the "device"
float32 rows equal their CPU reference (the dry device is the CPU)."""
import json
import os
import subprocess

from conftest import ROOT


def test_gpu_check_dry_run_covers_every_case(tmp_path):
    from scripts import gpu_check

    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "GPU_CHECK_TIMEOUT": "1200"}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--iterations", "1"],
                          capture_output=True, text=True, env=env, timeout=1300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["dry"] and report["device"] == "cpu"
    names = {row["case"].split(" (")[0] for row in report["rows"]}
    assert names == set(gpu_check.ALL_CASES)
    for row in report["rows"]:
        assert row["seconds"] > 0, row
        if row["precision"] == "fp32":
            assert row["dacc"] in (0, None) and row["dloss"] in (0, None), row
        if row["case"] in ("DC", "DM", "MTT"):
            assert row["loss"] is not None and row["acc"] is not None, row
    assert sum(row["precision"] == "bf16" for row in report["rows"]) == len(report["rows"]) // 2
    assert "Δacc vs CPU (pts)" in done.stdout and report["table"] in done.stdout
