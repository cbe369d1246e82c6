"""The command-line scripts end to end: one-line errors for user mistakes, a real-signal stop and
``--resume``, and a short DM distillation + evaluation on the real Fashion-MNIST."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import storage
from sets import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION) and not os.environ.get("CI"),
                                   reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")


def run(script, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--dataset", "NoSuchSet"], ["NoSuchSet", "FashionMNIST"]),
    (["--dataset", "CIFAR10", "--data_path", "/nonexistent/cifar"], ["/nonexistent/cifar", "cifar-10-batches-py"]),
    (["--dataset", "FashionMNIST", "--ipc", "0"], ["--ipc"]),
    (["--dataset", "FashionMNIST", "--model", "ConvNetXYZ"], ["ConvNetXYZ", "ConvNet"]),
    (["--dataset", "FashionMNIST", "--method", "RFAD"], ["RFAD", "KIP"]),
    (["--dataset", "FashionMNIST", "--dsa_strategy", "color_zoom"], ["--dsa_strategy", "zoom"]),
    (["--dataset", "FashionMNIST", "--device", "tpu"], ["--device"]),
    (["--dataset", "FashionMNIST", "--method", "CAFE", "--lambda_1", "-1"], ["--lambda_1", ">= 0"]),
    (["--dataset", "FashionMNIST", "--method", "DataDAM", "--attention_power", "0"], ["--attention_power", "> 0"]),
])
def test_distill_user_mistakes_are_one_line(tmp_path, args, needles):
    proc = run("distill.py", *args, "--save_path", str(tmp_path), "--Iteration", "1", timeout=120)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2


def test_evaluate_user_mistakes_are_one_line(tmp_path):
    assert_one_line_error(run("evaluate.py", "--dataset", "FashionMNIST", "--syn_path", str(tmp_path / "none.pt")),
                          "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"data": [[torch.randn(10, 3, 32, 32), torch.arange(10)]], "accs_all_exps": {}}, bad)
    assert_one_line_error(run("evaluate.py", "--dataset", "FashionMNIST", "--syn_path", str(bad)), "(3, 32, 32)")


@needs_fashion
def test_sigterm_then_resume_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["distill.py", "--method", "DM", "--dataset", "FashionMNIST", "--model", "ConvNetW32", "--ipc", "1",
            "--batch_real", "8", "--Iteration", "400", "--num_exp", "1", "--num_eval", "0", "--run_dir", str(run_dir),
            "--checkpoint_every", "0", "--no-vis"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr.strip().splitlines()[-1]
    saved = storage.load_checkpoint(str(run_dir / "last.pt"))
    stopped_at = saved["iteration"]
    assert 0 < stopped_at < 400
    done = run(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir / 'last.pt'} from experiment 0, iteration {stopped_at}" in done.stderr
    assert (run_dir / "res_DM_FashionMNIST_ConvNetW32_1ipc.pt").exists()


@needs_fashion
@pytest.mark.integration
def test_short_dm_on_real_fashion_mnist_and_evaluate(tmp_path):
    run_dir = tmp_path / "dm"
    proc = run("distill.py", "--method", "DM", "--dataset", "FashionMNIST", "--ipc", "2", "--Iteration", "5",
               "--batch_real", "64", "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "20",
               "--run_dir", str(run_dir), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    result = run_dir / "res_DM_FashionMNIST_ConvNet_2ipc.pt"
    blob = files.load_results(str(result))
    image_syn, label_syn = blob["data"][0]
    assert image_syn.shape == (20, 1, 28, 28) and label_syn.tolist() == [c for c in range(10) for _ in range(2)]
    acc = blob["accs_all_exps"]["ConvNet"][0]
    assert 0.3 < acc <= 1.0  # 20 real-initialised images already beat chance (0.1) by far
    assert "ConvNet" in proc.stdout and "result file" in proc.stdout
    assert list(run_dir.glob("vis_DM_FashionMNIST_ConvNet_2ipc_exp0_iter5.png"))

    out = tmp_path / "eval.json"
    proc = run("evaluate.py", "--dataset", "FashionMNIST", "--syn_path", str(result), "--num_eval", "1",
               "--epoch_eval_train", "20", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"ConvNet", "comparison"} and len(report["ConvNet"]["accs"]) == 1
    assert 0.3 < report["ConvNet"]["mean"] <= 1.0
    assert report["ConvNet"]["protocol"]["augmentation"].startswith("DSA")  # saved with the DM set

    # random real images of the same ipc, evaluated beside the set under its protocol (the fair comparison)
    random_rows = [row for row in report["comparison"]["rows"] if row["kind"] == "random"]
    assert [row["ipc"] for row in random_rows] == [2]
    assert 0.2 < random_rows[0]["results"]["ConvNet"]["mean"] <= 1.0
    assert random_rows[0]["results"]["ConvNet"]["protocol"]["augmentation"].startswith("DSA")


def test_the_stages_import_torchvision_only_when_a_dataset_is_read():
    """Importing torchvision costs about a second (it loads torch._dynamo): ``--help`` and a refused
    flag of every stage must not pay it; reading Fashion-MNIST does (its IDX reader is torchvision's)."""
    probe = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('torchvision' in sys.modules)\n")
    for stage in ("distill.py", "evaluate.py", "buffer.py", "train_original.py"):
        done = subprocess.run([sys.executable, "-c", probe, os.path.join(ROOT, stage)], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False", (stage, done.stderr[-2000:])
    read = subprocess.run([sys.executable, "-c", "import sys, data; data.load_dataset('FashionMNIST', "
                           "data_path='/nonexistent'); print('torchvision' in sys.modules)"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert read.returncode == 0 and read.stdout.strip() == "True", read.stderr[-2000:]
