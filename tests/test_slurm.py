"""Batch jobs on a real SLURM: the one-node cluster of ``scripts/slurm/local_cluster.sh`` (started once
for this module, stopped at its end), a sweep submitted as a job array by ``scripts/sweep.py --scheduler
slurm`` (4 tiny DM/DC runs on Fashion-MNIST), one element stopped by the time-limit warning
(SIGUSR1 to its batch shell: it requeues itself) and one requeued by ``scontrol requeue`` while they
run; both continue with ``--resume`` to the sets of uninterrupted runs, bit for bit, and the gathered
table has the four grid points. Also, without a cluster: grid expansion, the array script, the
local scheduler's skip of finished points and the table of missing and failed points.

The cluster needs slurm-wlm and munge, or root to install them (``bash .ci/run`` runs as root and
installs them); only a machine with neither skips those tests, CI never does.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

SWEEP = os.path.join(ROOT, "scripts", "sweep.py")
CLUSTER = os.path.join(ROOT, "scripts", "slurm", "local_cluster.sh")
FASHION = "/usr/share/datasets/fashion-mnist"
HAVE_SLURM = os.geteuid() == 0 or shutil.which("slurmctld") is not None
needs_slurm = pytest.mark.skipif(not HAVE_SLURM and not os.environ.get("CI"),
                                 reason="SLURM (slurm-wlm, munge) is not installed and this is not root (CI installs it)")
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION) and not os.environ.get("CI"),
                                   reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
GRID = ["--methods", "DM", "DC", "--datasets", "FashionMNIST", "--ipcs", "1", "--seeds", "0", "1"]
# Tiny but real: ConvNetW32, one evaluation network at the end, a checkpoint every iteration.
TINY = ("--model ConvNetW32 --eval_it 0 --Iteration 30 --num_eval 1 --epoch_eval_train 2 --batch_real 16 "
        "--num_exp 1 --threads 1 --checkpoint_every 1 --no-vis")
POINTS = ["DM_FashionMNIST_ipc1_seed0", "DM_FashionMNIST_ipc1_seed1", "DC_FashionMNIST_ipc1_seed0",
          "DC_FashionMNIST_ipc1_seed1"]


def free_ports(count: int) -> list:
    """``count`` distinct TCP ports free now (all probes held open together)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def sweep(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, SWEEP, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env or os.environ, timeout=timeout)


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"waited {seconds} s for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment (``SLURM_CONF``) of a local cluster in a fresh directory, on free ports."""
    where = tmp_path_factory.mktemp("slurm")
    # A requeued job starts again once its credential expired: 10 s here keeps the module short.
    ctld_port, slurmd_port = free_ports(2)
    env = {**os.environ, "SLURMCTLD_PORT": str(ctld_port), "SLURMD_PORT": str(slurmd_port), "SLURM_CRED_EXPIRE": "10"}
    started = subprocess.run(["bash", CLUSTER, "start", str(where)], capture_output=True, text=True, env=env,
                             timeout=600)
    assert started.returncode == 0, started.stderr[-2000:]
    conf = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)
    assert conf and os.path.isfile(conf.group(1)), started.stdout
    env["SLURM_CONF"] = conf.group(1)
    yield {"env": env, "dir": str(where)}
    stopped = subprocess.run(["bash", CLUSTER, "stop", str(where)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert "stopped 3 daemon(s)" in stopped.stderr, stopped.stderr


@needs_slurm
def test_local_cluster_runs_one_idle_node_and_start_is_idempotent(cluster):
    env = cluster["env"]
    status = subprocess.run(["bash", CLUSTER, "status", cluster["dir"]], capture_output=True, text=True, env=env)
    assert status.returncode == 0 and status.stdout.count(": running (pid") == 3, status.stdout
    pids = re.findall(r"pid (\d+)", status.stdout)
    again = subprocess.run(["bash", CLUSTER, "start", cluster["dir"]], capture_output=True, text=True, env=env,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    status = subprocess.run(["bash", CLUSTER, "status", cluster["dir"]], capture_output=True, text=True, env=env)
    assert re.findall(r"pid (\d+)", status.stdout) == pids  # the same daemons, none started twice
    node = subprocess.run(["sinfo", "-h", "-o", "%t %c %P"], capture_output=True, text=True, env=env).stdout.split()
    assert node[0] in ("idle", "mix", "alloc") and int(node[1]) == os.cpu_count() and node[2] == "debug*"
    with open(env["SLURM_CONF"]) as handle:
        conf = handle.read()
    for line in ("SelectType=select/cons_tres", "ProctrackType=proctrack/linuxproc", "PreemptMode=REQUEUE"):
        assert line in conf


@needs_slurm
@needs_fashion
def test_array_requeue_and_time_limit_stop_resume_bit_exactly_and_gather(cluster, tmp_path):
    env = cluster["env"]
    root = tmp_path / "sweep"
    submitted = sweep(*GRID, "--extra", TINY, "--root", root, "--scheduler", "slurm", "--throttle", "2",
                      "--python", sys.executable, env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job = re.search(r"submitted job array (\d+): 4 grid point", submitted.stdout).group(1)
    twice = sweep(*GRID, "--extra", TINY, "--root", root, "--scheduler", "slurm", env=env)
    assert twice.returncode == 2 and f"job array {job} of this sweep" in twice.stderr, twice.stderr
    # The uninterrupted runs of the two points stopped below, here and meanwhile (same flags).
    reference_root = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, SWEEP, "--methods", "DC", "--datasets", "FashionMNIST", "--ipcs", "1",
                                  "--seeds", "0", "1", "--extra", TINY, "--root", str(reference_root)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logs = root / "_sweep" / "logs"

    def log(index):
        path = logs / f"{job}_{index}.out"
        return path.read_text() if path.exists() else ""

    # Element 2 (DC seed 0) under way (its first checkpoint written): the time-limit warning.
    wait_for(lambda: (root / POINTS[2] / "last.pt").exists(), 240, "element 2's first checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_2"], env=env, check=True, timeout=60)
    wait_for(lambda: "requeueing" in log(2), 120, "element 2 to requeue itself")
    # Element 3 (DC seed 1) under way: requeued by the scheduler.
    wait_for(lambda: (root / POINTS[3] / "last.pt").exists(), 240, "element 3's first checkpoint")
    subprocess.run(["scontrol", "requeue", f"{job}_3"], env=env, check=True, timeout=60)

    def array_done():
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env).stdout
        return not queued.strip()

    wait_for(array_done, 300, f"job array {job} to end")
    for point in POINTS:
        assert (root / point / "results.json").is_file(), (point, log(POINTS.index(point)))
    for index in (2, 3):
        text = log(index)
        assert re.search(r"resuming \S+last\.pt from experiment 0, iteration \d+", text), text
        assert "start 2" in text
    assert "stopped before the time limit (distill exit 130); requeueing" in log(2)
    assert "requeueing" not in log(3)  # the scheduler requeued it, not the task
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    for point in POINTS[2:]:
        name = "res_DC_FashionMNIST_ConvNetW32_1ipc.pt"
        got = torch.load(root / point / name, weights_only=True)["data"][0]
        want = torch.load(reference_root / point / name, weights_only=True)["data"][0]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), point

    gathered = sweep("gather", root, env=env)
    assert gathered.returncode == 0, gathered.stderr
    table = (root / "sweep_table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| grid point")]
    assert [row.split("|")[1].strip() for row in rows] == POINTS
    assert all("| finished |" in row for row in rows)
    # A resubmission skips every finished point and submits nothing.
    again = sweep(*GRID, "--extra", TINY, "--root", root, "--scheduler", "slurm", env=env)
    assert again.returncode == 0 and "all 4 grid point(s) finished" in again.stdout and "submitted" not in again.stdout


@needs_slurm
def test_a_job_of_the_urgent_partition_preempts_a_debug_job_which_is_requeued(cluster, tmp_path):
    env = cluster["env"]
    out = tmp_path / "low.out"
    script = ("trap 'echo TERM; exit 130' TERM; echo start $((${SLURM_RESTART_COUNT:-0} + 1)); "
              "[ ${SLURM_RESTART_COUNT:-0} -gt 0 ] && exit 0; for i in $(seq 120); do sleep 0.5; done")
    low = subprocess.run(["sbatch", "--parsable", "--requeue", "--exclusive", "--open-mode=append", "-o", str(out),
                          "--wrap", script], capture_output=True, text=True, env=env, check=True,
                         cwd=tmp_path).stdout.strip()
    wait_for(lambda: out.exists() and "start 1" in out.read_text(), 60, "the debug job to start")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--exclusive", "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "true"], capture_output=True, text=True, env=env, check=True,
                            cwd=tmp_path).stdout.strip()
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", f"{low},{urgent}"], capture_output=True, text=True,
                                        env=env).stdout.strip(), 120, "both jobs to end")
    text = out.read_text()
    assert "DUE TO PREEMPTION" in text, text
    assert re.findall(r"^(start \d|TERM)$", text, re.M) == ["start 1", "TERM", "start 2"], text


@needs_slurm
@needs_fashion
def test_torchrun_under_srun_stops_on_the_warning_and_resumes_with_two_processes(cluster, tmp_path):
    env = cluster["env"]
    root = tmp_path / "torchrun"
    extra = TINY.replace("--Iteration 30", "--Iteration 100") + " --device cpu"
    submitted = sweep("--methods", "DM", "--datasets", "FashionMNIST", "--ipcs", "1", "--extra", extra, "--root", root,
                      "--scheduler", "slurm", "--nproc_per_node", "2", "--cpus_per_task", "2", "--srun",
                      "--python", sys.executable, env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job = re.search(r"submitted job array (\d+)", submitted.stdout).group(1)
    run_dir = root / "DM_FashionMNIST_ipc1_seed0"
    wait_for(lambda: (run_dir / "last.pt").exists(), 240, "the first checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], env=env, check=True, timeout=60)
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True,
                                        env=env).stdout.strip(), 300, f"job array {job} to end")
    log = (root / "_sweep" / "logs" / f"{job}_0.out").read_text()
    assert (run_dir / "results.json").is_file(), log
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
    stopped = re.findall(r"stopped at experiment 0, iteration (\d+)", log)
    assert len(stopped) == 2 and stopped[0] == stopped[1], log  # both ranks, the same iteration
    assert f"from experiment 0, iteration {stopped[0]}" in log and "requeueing" in log


def test_local_cluster_fails_in_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    failed = subprocess.run(["bash", CLUSTER, "start", str(tmp_path / "taken")], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert "local_cluster: error: cannot create the directories of" in failed.stderr and "taken" in failed.stderr
    usage = subprocess.run(["bash", CLUSTER, "restart"], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop|status" in usage.stderr
    down = subprocess.run(["bash", CLUSTER, "status", str(tmp_path / "none")], capture_output=True, text=True)
    assert down.returncode == 1 and down.stdout.count("not running") == 3


def test_grid_expansion_and_the_array_script(tmp_path):
    from scripts import sweep as sweep_module

    points = sweep_module.expand_grid(["DC", "DM"], ["CIFAR10"], [1, 10], [0], "--Iteration 5")
    assert [p.name for p in points] == ["DC_CIFAR10_ipc1_seed0", "DC_CIFAR10_ipc10_seed0", "DM_CIFAR10_ipc1_seed0",
                                        "DM_CIFAR10_ipc10_seed0"]
    assert points[1].argv == ("--method", "DC", "--dataset", "CIFAR10", "--ipc", "10", "--seed", "0", "--Iteration", "5")
    assert sweep_module.array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    printed = sweep("--methods", "DC", "DM", "--datasets", "CIFAR10", "--ipcs", "1", "10", "50", "--root", tmp_path,
                    "--scheduler", "slurm", "--dry", "--gres", "gpu:1", "--time", "12:00:00", "--throttle", "3",
                    "--extra", "--device cuda")
    assert printed.returncode == 0, printed.stderr
    for line in ("#SBATCH --array=0-5%3", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --time=12:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --open-mode=append"):
        assert line in printed.stdout
    assert printed.stdout.count("distill.py --method") == 6 and not list(tmp_path.iterdir())  # nothing written
    torchrun = sweep("--methods", "DM", "--datasets", "CIFAR10", "--ipcs", "50", "--root", tmp_path, "--scheduler",
                     "slurm", "--dry", "--nodes", "2", "--nproc_per_node", "4")
    assert "#SBATCH --nodes=2" in torchrun.stdout and "SWEEP_NPROC_PER_NODE=4" in torchrun.stdout
    wrong = sweep("--methods", "DC", "--datasets", "CIFAR10", "--ipcs", "0", "--root", tmp_path, "--dry")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--ipc" in wrong.stderr
    scripts = sorted(os.listdir(os.path.join(ROOT, "scripts", "slurm")))
    assert scripts == ["array_task.sh", "local_cluster.sh", "torchrun.sbatch"]
    for script in scripts:
        checked = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "slurm", script)], capture_output=True)
        assert checked.returncode == 0, checked.stderr


def test_local_sweep_skips_finished_points_and_gather_lists_missing_and_failed(tmp_path):
    from scripts import sweep as sweep_module

    root = tmp_path / "sweep"
    finished = root / "DM_FashionMNIST_ipc1_seed0"
    finished.mkdir(parents=True)
    results = {"method": "DM", "dataset": "FashionMNIST", "ipc": 1, "seed": 0, "seconds_per_iteration": 0.5,
               "accuracy": {"ConvNet": {"mean": 0.5, "std": 0.01, "accs": [0.49, 0.51]}},
               "cost": {"distill_seconds": 12.0, "peak_memory": {"bytes": 2 ** 30}}}
    (finished / "results.json").write_text(json.dumps(results))
    rows = [{"kind": "synthetic", "results": {"ConvNet": {"mean": 0.5, "std": 0.01}}},
            {"kind": "random", "results": {"ConvNet": {"mean": 0.4, "std": 0.02}}}]
    (finished / "eval.json").write_text(json.dumps({"comparison": {"models": ["ConvNet"], "rows": rows}}))
    (root / "DM_FashionMNIST_ipc1_seed2").mkdir()
    (root / "DM_FashionMNIST_ipc1_seed2" / "last.pt").write_bytes(b"")
    printed = sweep("--methods", "DM", "--datasets", "FashionMNIST", "--ipcs", "1", "--seeds", "0", "1", "2", "3",
                    "--root", root, "--dry")
    assert printed.returncode == 0, printed.stderr
    assert "DM_FashionMNIST_ipc1_seed0: finished, skipped" in printed.stdout
    commands = [line for line in printed.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 3 and all(c.endswith("--resume") for c in commands)
    # The grid as the sweep records it, and seed 3's distill.py failing with exit 2.
    points = sweep_module.expand_grid(["DM"], ["FashionMNIST"], [1], [0, 1, 2, 3])
    sweep_module.write_grid(str(root), points, 0)
    (root / "_sweep" / "exit").mkdir()
    (root / "_sweep" / "exit" / "DM_FashionMNIST_ipc1_seed3").write_text("distill 2\n")
    assert sweep_module.main(["gather", str(root)]) == 1  # not every point finished
    table = (root / "sweep_table.md").read_text()
    assert "| DM_FashionMNIST_ipc1_seed0 | finished | 50.00 ± 1.00 | 40.00 ± 2.00 | 2 | 12.0 | 0.500 | 1024 |" in table
    assert "| DM_FashionMNIST_ipc1_seed1 | not run |" in table
    assert "| DM_FashionMNIST_ipc1_seed2 | stopped (last.pt kept) |" in table
    assert "| DM_FashionMNIST_ipc1_seed3 | failed (distill exit 2) |" in table
    with open(root / "sweep_table.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 5
