"""Trust, round two (issue 25): a run directory is owned by one process, and outputs never replace inputs.

A. ``distill.py`` holds ``RUN_DIR/.lock`` (``fcntl.flock``) while it runs: a second process on the
   same run directory, with or without ``--resume``, is refused in one line naming the first one's
   process id (the first is a separate Python process holding the lock here); the lock is released
   on every exit; a non-empty directory holding no run of this toolkit is refused, an empty one is
   used; only the toolkit's own stale temporaries (``NAME.tmpPID``, regular files) are removed.
B. ``evaluate.py --out`` is never an input (same file, hard link or symbolic link), names the JSON
   (the CSV beside it is another file), and no write follows a symbolic link planted in a run
   directory (``log.txt``, the atomic writer's temporary and target).
"""
import logging
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import storage
import utils
from methods.run_dir import claim_run_dir
from methods.runner import RunOptions, run_distillation
from sets import files
from tiny_data import CPU, tiny_record

pytestmark = pytest.mark.usefixtures("one_thread")

# A second process that takes the run directory's lock as the toolkit does, writes its id, says so and sleeps.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """``start(directory)`` starts a Python process holding ``directory``'s lock (returns it); every
    process started is killed at the end."""
    started = []

    def start(directory):
        os.makedirs(directory, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), storage.LOCK_NAME],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def distill_argv(run_dir, *extra):
    return ["--method", "DM", "--dataset", "Tiny3", "--model", "ConvNetW32", "--ipc", "1", "--Iteration", "1",
            "--num_exp", "1", "--num_eval", "1", "--epoch_eval_train", "1", "--batch_real", "4", "--no-vis",
            "--device", "cpu", "--threads", "1", *(["--run_dir", str(run_dir)] if run_dir is not None else []), *extra]


def one_line_exit(capsys, main, argv, *needles):
    """``main(argv)`` ends with exit code 2 and one ``error:`` line on stderr holding every needle."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


def lock_is_free(directory):
    """Whether a fresh open file description can take ``directory``'s lock (then releases it)."""
    import fcntl

    fd = os.open(os.path.join(directory, storage.LOCK_NAME), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ----- A. one process per run directory ---------------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_process_on_a_run_directory_is_one_line_naming_the_first(tmp_path, fake_dataset, capsys, holder,
                                                                         resume):
    import distill

    run = tmp_path / "run"
    first = holder(run)
    one_line_exit(capsys, distill.main, distill_argv(run, *(["--resume"] if resume else [])),
                  f"--run_dir {run} is in use by process {first.pid}", "choose another --run_dir")
    assert sorted(os.listdir(run)) == [storage.LOCK_NAME]  # no log.txt, no config.yaml: nothing was touched
    first.kill()
    first.wait()
    assert distill.main(distill_argv(run)) == 0  # the lock died with its process
    assert (run / "results.json").is_file() and lock_is_free(run)
    assert int((run / storage.LOCK_NAME).read_text()) == os.getpid()  # the id of the run that held it


def test_the_lock_is_released_on_an_error_and_is_reentrant(tmp_path, fake_dataset, capsys, holder):
    import distill

    run = tmp_path / "run"
    one_line_exit(capsys, distill.main, distill_argv(run, "--ipc", "1000"), "--ipc 1000 exceeds")
    assert lock_is_free(run)  # refused after the lock was taken: released on the way out
    with storage.lock_directory(str(run)) as path:
        assert not lock_is_free(run)
        with storage.lock_directory(str(run)), claim_run_dir(str(run)):  # the same process: shared
            pass
        assert not lock_is_free(run) and path == os.path.join(os.path.realpath(run), storage.LOCK_NAME)
    assert lock_is_free(run)
    with pytest.raises(RuntimeError), storage.lock_directory(str(run)):
        raise RuntimeError("inside")
    assert lock_is_free(run)
    other = tmp_path / "other"
    first = holder(other)
    with pytest.raises(storage.DirectoryInUse) as error:
        with storage.lock_directory(str(other)):
            pass
    assert error.value.pid == first.pid


def test_the_runner_itself_takes_the_lock(tmp_path, holder):
    record = tiny_record(per_class=8)
    run = tmp_path / "run"
    first = holder(run)
    cfg = _dm(record)
    with pytest.raises(utils.UserError, match=f"in use by process {first.pid}"):
        run_distillation(cfg, RunOptions(num_exp=1, num_eval=0, run_dir=str(run), save_vis=False), record, CPU)


def _dm(record):
    import methods

    return methods.DistillConfig(method="DM", dataset=record.name, model="ConvNetW32", ipc=1, iterations=1,
                                 batch_real=4, init="real", dsa_strategy="")


def test_a_directory_of_other_files_is_refused_and_an_empty_one_used(tmp_path, fake_dataset, capsys):
    import distill

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    for resume in ([], ["--resume"]):
        one_line_exit(capsys, distill.main, distill_argv(foreign, *resume),
                      f"--run_dir {foreign} is not empty and holds no run of this toolkit",
                      "choose an empty or new --run_dir")
    assert os.listdir(foreign) == ["holiday.jpg"]  # no log.txt, no lock file
    # through --save_path: only the run directory itself counts, not the shared parent
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("someone's")
    assert distill.main(distill_argv(None, "--save_path", str(shared))) == 0
    run = shared / "DM_Tiny3_ConvNetW32_1ipc"
    assert (run / "results.json").is_file()
    (run / "holiday.jpg").write_bytes(b"")  # beside a run: still a run directory
    one_line_exit(capsys, distill.main, distill_argv(None, "--save_path", str(shared)), "already holds a run")
    assert distill.main(distill_argv(None, "--save_path", str(shared), "--resume")) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert distill.main(distill_argv(empty)) == 0 and (empty / "results.json").is_file()


def test_only_the_toolkits_own_stale_temporaries_are_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    stale = tmp_path / f"last.pt.tmp{dead}"
    stale.write_bytes(b"half")
    kept = [f"data.tmp{dead}.bak", f"x.tmp{dead}x", "notes.tmp", f".tmp{dead}", f"x.tmp0{dead}"]
    for name in kept:
        (tmp_path / name).write_text("someone's")
    (tmp_path / f"folder.tmp{dead}").mkdir()
    os.symlink(victim, tmp_path / f"link.pt.tmp{dead}")
    assert storage.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    for name in [*kept, f"folder.tmp{dead}", f"link.pt.tmp{dead}"]:
        assert os.path.lexists(tmp_path / name), name
    assert victim.read_text() == "precious"


# ----- B. outputs never replace inputs ----------------------------------------------------------
@pytest.fixture
def saved_run(tmp_path):
    """A run directory with a result file, ``results.json`` and ``config.yaml``."""
    record = tiny_record()
    run = tmp_path / "run"
    images = record.images_train[::8][:3]
    files.save_results(str(run / "res_DM_Tiny3_ConvNetW32_1ipc.pt"), [[images, torch.arange(3)]], {})
    (run / "results.json").write_text("{}\n")
    (run / "config.yaml").write_text("method: DM\n")
    return run


def evaluate_argv(syn_path, out):
    return ["--dataset", "Tiny3", "--syn_path", str(syn_path), "--models", "ConvNetW32", "--num_eval", "1",
            "--epoch_eval_train", "1", "--device", "cpu", "--no-random_baseline", "--out", str(out)]


@pytest.mark.parametrize("case", ["same", "hardlink", "symlink", "results.json", "config.yaml", "csv_is_input"])
def test_out_is_never_an_input(saved_run, tmp_path, capsys, monkeypatch, case):
    import evaluate

    monkeypatch.setattr("data.load_dataset", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    result = saved_run / "res_DM_Tiny3_ConvNetW32_1ipc.pt"
    before = {path: path.read_bytes() for path in saved_run.iterdir()}
    syn, input_file = result, result
    if case == "same":
        out = result
    elif case == "hardlink":
        out = tmp_path / "eval.json"
        os.link(result, out)
    elif case == "symlink":
        out = tmp_path / "eval.json"
        os.symlink(result, out)
    elif case == "csv_is_input":  # --out run/summary.json would write its CSV over run/summary.csv
        (saved_run / "summary.csv").write_text("iteration,model\n")
        before[saved_run / "summary.csv"] = b"iteration,model\n"
        out, syn, input_file = saved_run / "summary.json", saved_run, saved_run / "summary.csv"
    else:  # a run file of a --syn_path directory
        out, syn, input_file = saved_run / case, saved_run, saved_run / case
    line = one_line_exit(capsys, evaluate.main, evaluate_argv(syn, out), f"--out {out}:", f"is the input {input_file}")
    assert "choose another --out" in line
    assert {path: path.read_bytes() for path in saved_run.iterdir()} == before


def test_out_names_the_json_and_the_csv_is_another_file(saved_run, tmp_path, capsys, fake_dataset):
    import evaluate

    one_line_exit(capsys, evaluate.main, evaluate_argv(saved_run, tmp_path / "table.csv"),
                  "--out", "names the JSON report; the CSV is written beside it", f"{tmp_path / 'table'}.json")
    assert not (tmp_path / "table.csv").exists()
    out = saved_run / "eval.json"
    assert evaluate.main(evaluate_argv(saved_run, out)) == 0
    assert out.read_text().startswith("{") and "comparison" in out.read_text()
    csv = (saved_run / "eval.csv").read_text()
    assert csv and not csv.startswith("{") and "," in csv.splitlines()[0]


def test_a_planted_log_link_is_refused_and_not_followed(tmp_path, fake_dataset, capsys):
    import distill

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "log.txt")
    one_line_exit(capsys, distill.main, distill_argv(run), f"{run / 'log.txt'} is a symbolic link")
    assert victim.read_text() == "precious\n"
    with pytest.raises(OSError):  # the handler itself never opens through a link (a link planted later)
        cli.NoFollowFileHandler(str(run / "log.txt"))
    plain = cli.NoFollowFileHandler(str(tmp_path / "plain.log"))
    plain.handle(logging.LogRecord("t", logging.ERROR, __file__, 0, "written", (), None))
    plain.close()
    assert (tmp_path / "plain.log").read_text() == "written\n" and victim.read_text() == "precious\n"


def test_the_atomic_writer_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / f"results.json.tmp{os.getpid()}")  # its temporary's name, planted
    storage.write_json(str(run / "results.json"), {"a": 1})
    os.symlink(victim, run / "summary.csv")  # the target itself, planted
    storage.write_text(str(run / "summary.csv"), "x\n")
    assert victim.read_text() == "precious"
    assert (run / "results.json").read_text() == '{\n  "a": 1\n}\n'
    assert not os.path.islink(run / "summary.csv") and (run / "summary.csv").read_text() == "x\n"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")])
def test_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch, error):
    # torch.save reports a short write as "unexpected pos"; with the disk full that is the reason.
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    path = tmp_path / "results.json"

    def fail(tmp):
        open(tmp, "w").close()
        raise error

    with pytest.raises(OSError, match=r"\(no space left on device\); nothing was replaced") as refused:
        storage.atomic_write(str(path), fail)
    assert str(refused.value).startswith(f"cannot write {path}") and not list(tmp_path.iterdir())
    path.write_text("kept")
    with pytest.raises(OSError, match=r"\(no space left on device\); the previous file is intact"):
        storage.atomic_write(str(path), fail)
    assert path.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_other_scripts_out_is_never_an_input(saved_run, tmp_path, capsys, monkeypatch):
    from scripts import continual, cost

    monkeypatch.setattr("data.load_dataset", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    result = saved_run / "res_DM_Tiny3_ConvNetW32_1ipc.pt"
    before = {path: path.read_bytes() for path in saved_run.iterdir()}
    link = tmp_path / "cl.json"
    os.symlink(result, link)
    one_line_exit(capsys, continual.main, ["--dataset", "Tiny3", "--syn_path", str(saved_run), "--steps", "1",
                                           "--model", "ConvNetW32", "--device", "cpu", "--out", str(link)],
                  f"--out {link}: is the input {result}")
    (saved_run / "results.json").write_text('{"cost": {}}\n')
    before[saved_run / "results.json"] = b'{"cost": {}}\n'
    out = saved_run / "results.json"
    one_line_exit(capsys, cost.main, ["--dataset", "FashionMNIST", "--models", "MLP", "--run_dir", str(saved_run),
                                      "--out", str(out)], f"--out {out}: is the input {out}")
    assert {path: path.read_bytes() for path in saved_run.iterdir()} == before
