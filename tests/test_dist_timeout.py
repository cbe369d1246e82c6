"""torchrun timeouts (``--dist_timeout``): a rank that works longer than the timeout
(``progress.tick``) is waited for; a rank that neither reaches a collective nor finishes a
training step within the timeout ends every rank with one line naming it and exit code 4.

Two ranks joined by gloo are started as plain processes with the environment torchrun would set
(each one's output apart), running a small driver written into the test's folder: it joins the
group through ``cli.setup_runtime`` (so ``--dist_timeout`` is the flag's path) inside
``cli.user_errors`` (the stage scripts' handler), passes a barrier; rank 1 then trains (ticks) for
twice the timeout before the next collective, and after it sleeps as long (one launch for both, a
busy 2-core machine starts torch slowly).
"""
import argparse
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import cli
import distributed
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 3  # --dist_timeout of the run
JOIN_TIMEOUT_S = 240  # generous: the test's own bound is asserted below

DRIVER = r'''
import argparse, os, pathlib, sys, time

import cli, distributed, progress

folder = pathlib.Path(sys.argv[1])
# Both ranks have imported torch before either joins (the rendezvous shares --dist_timeout).
(folder / f"ready{os.environ['RANK']}").touch()
while not all((folder / f"ready{r}").exists() for r in range(2)):
    time.sleep(0.05)
parser = argparse.ArgumentParser()
cli.add_runtime_args(parser)
args = parser.parse_args(sys.argv[2:])


def away(ticking):
    """Rank 1 works (a training step every 10 ms) or hangs for twice the timeout."""
    if distributed.rank() == 1:
        until = time.monotonic() + 2 * args.dist_timeout
        while time.monotonic() < until:
            if ticking:
                progress.tick()
            time.sleep(0.01)


with cli.user_errors():
    cli.setup_runtime(args)
    distributed.barrier()
    away(ticking=True)
    distributed.any_flag(False)
    print(f"rank {distributed.rank()} waited for the busy rank", flush=True)
    away(ticking=False)
    distributed.barrier()
    print(f"rank {distributed.rank()} passed the stuck rank", flush=True)
distributed.shutdown()
'''


def run_two_ranks(tmp_path):
    """Start the driver on 2 ranks; returns ``[(exit code, stdout, stderr), ...]`` by rank."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        env.pop(distributed.TIMEOUT_ENV, None)
        procs.append(subprocess.Popen([sys.executable, str(driver), str(tmp_path), "--device", "cpu",
                                       "--threads", "1", "--dist_timeout", str(TIMEOUT_S)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [proc.communicate(timeout=JOIN_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def test_a_busy_rank_is_waited_for_and_a_stuck_one_ends_every_rank_in_one_line(tmp_path):
    start = time.monotonic()
    (code0, out0, err0), (code1, out1, err1) = run_two_ranks(tmp_path)
    # Past the first collective (rank 1 ticked for twice the timeout), not past the second.
    assert out0.splitlines() == ["rank 0 waited for the busy rank"] and out1.splitlines() == [
        "rank 1 waited for the busy rank"], (out0, out1, err0, err1)
    assert code0 == code1 == cli.EXIT_DISTRIBUTED, (err0, err1)
    assert err0.splitlines() == [
        f"error: rank 1 did not reach barrier within --dist_timeout {TIMEOUT_S} s, nor finished a training step in "
        f"that time; every rank stops; {cli.DIST_KEPT}"], err0
    # Rank 1 arrives after rank 0 has left: one line too (the store rank 0 hosted is gone, or,
    # were rank 0 still there, the message it left in the store), no traceback or C++ dump.
    assert len(err1.splitlines()) == 1, err1
    assert err1.startswith("error: rank 1 reached barrier after the other ranks had stopped"), err1
    assert time.monotonic() - start < JOIN_TIMEOUT_S


@pytest.mark.parametrize("value, why", [("0", "> 0"), ("-1", "> 0"), ("nan", "a finite number > 0"),
                                        ("inf", "a finite number > 0")])
def test_dist_timeout_refuses_a_value_not_above_zero_in_one_line(value, why, capsys):
    parser = cli.OneLineParser()
    cli.add_runtime_args(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--dist_timeout", value])
    assert stop.value.code == cli.EXIT_USER
    assert capsys.readouterr().err.splitlines() == [f"error: --dist_timeout must be {why}, got {value}"]
    with pytest.raises(ValueError, match=f"^--dist_timeout {value}: the timeout must be a finite number of "
                                         "seconds above 0$"):  # the library's own check (init's timeout_s)
        distributed.resolve_timeout(float(value))


def test_dist_timeout_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    parser = cli.OneLineParser()
    cli.add_runtime_args(parser)
    assert cli.dist_timeout(parser.parse_args([])) == 42.0
    assert cli.dist_timeout(parser.parse_args(["--dist_timeout", "7"])) == 7.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "-5")
    with pytest.raises(utils.UserError, match=r"^DD_DIST_TIMEOUT_S=-5: the timeout must be"):
        cli.dist_timeout(parser.parse_args([]))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="DD_DIST_TIMEOUT_S='soon'"):
        distributed.resolve_timeout(None)
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.resolve_timeout(None) == distributed.DEFAULT_TIMEOUT_S == 600.0


def test_distill_says_which_checkpoint_a_timeout_keeps(tmp_path, monkeypatch, capsys, one_thread):
    """A collective that fails at iteration 3 (checkpoints after 1 and 2): distill's line names
    last.pt of iteration 2 and --resume, exit code 4."""
    import methods
    from methods.runner import RunOptions, run_distillation
    from tiny_data import tiny_record

    calls = []

    def stop_flag(flag):
        calls.append(flag)
        if len(calls) == 3:
            raise distributed.CollectiveError("rank 1 did not reach all_reduce (stop flag) within --dist_timeout 5 s")
        return bool(flag)

    monkeypatch.setattr(distributed, "any_flag", stop_flag)
    cfg = methods.DistillConfig(method="DM", dataset="Tiny3", model="ConvNetW32", ipc=1, iterations=5, lr_img=1.0,
                                batch_real=8, init="real")
    opts = RunOptions(num_exp=1, num_eval=0, eval_it=0, eval_models=("ConvNetW32",), seed=0,
                      run_dir=str(tmp_path / "run"), checkpoint_every=1, save_vis=False)
    with pytest.raises(SystemExit) as stop, cli.user_errors():
        run_distillation(cfg, opts, tiny_record(num_classes=3, per_class=8, size=8), torch.device("cpu"))
    assert stop.value.code == cli.EXIT_DISTRIBUTED
    checkpoint = os.path.join(opts.run_dir, "last.pt")
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 1 did not reach all_reduce (stop flag) within --dist_timeout 5 s; every rank stops; checkpoint "
        f"{checkpoint} (experiment 0, iteration 2) is kept; re-run the same command with --resume to continue"]
