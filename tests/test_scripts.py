"""Every script in scripts/ is exercised: each ``scripts/*.py`` command answers ``--help`` (and each
helper module is imported by one); each shell or SLURM script passes ``bash -n``; the scripts with
a dry mode (``DRY_RUN=1`` of quickstart.sh and the table drivers) print stage commands that parse
and resolve as the stage scripts would parse them, and their result tables are printed from results
that are already there (nothing is trained); fmnist_cpu_table.sh's ``--dry`` runs every group for
real on a generated miniature, as do the soft-label ``ipc1`` table and a defaults sweep under
``TINY=1``.
``scripts/gpu_check.sh``'s dry mode (``DEVICE=cpu``) runs in test_gpu_check.py."""
import glob
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

import methods
from conftest import ROOT, check_stage_command

SCRIPTS_PY = sorted(p for p in glob.glob(os.path.join(ROOT, "scripts", "*.py")) if not p.endswith("__init__.py"))
# Commands (a ``__main__`` block) and the helper modules they import (gpu_check_data.py has both).
PY_SCRIPTS = [p for p in SCRIPTS_PY if re.search(r"__name__ == ['\"]__main__['\"]", open(p).read())]
HELPER_MODULES = [p for p in SCRIPTS_PY if p not in PY_SCRIPTS]
SHELL_SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")) + glob.glob(os.path.join(ROOT, "scripts", "*.sbatch")))
STAGE = re.compile(r"^\+ python3 (distill|evaluate|buffer|train_original)\.py (.*)$")
# The groups of fmnist_cpu_table.sh, as its ALL_GROUPS lists them (``--dry`` runs them in this order).
FMNIST_GROUPS = tuple(re.search(r"^ALL_GROUPS=\(([^)]*)\)", open(os.path.join(ROOT, "scripts", "fmnist_cpu_table.sh")).read(),
                                re.M).group(1).split())


@pytest.mark.parametrize("path", PY_SCRIPTS, ids=os.path.basename)
def test_python_script_answers_help(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(path, run_name="__main__")
    assert stopped.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", HELPER_MODULES, ids=os.path.basename)
def test_a_helper_module_without_a_command_line_is_imported_by_a_script(path):
    """A ``scripts/*.py`` file without a ``__main__`` block is a helper: some command imports it."""
    name = os.path.basename(path)[:-3]
    importers = [other for other in PY_SCRIPTS if re.search(rf"^from scripts(\.{name} import| import .*\b{name}\b)",
                                                            open(other).read(), re.M)]
    assert importers, f"scripts/{name}.py has no command line and no script imports it"


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=os.path.basename)
def test_shell_script_parses(path):
    checked = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_no_script_edits_the_import_path():
    for path in SCRIPTS_PY + SHELL_SCRIPTS + glob.glob(os.path.join(ROOT, "tests", "*.py")):
        with open(path) as handle:
            text = handle.read()
        if os.path.basename(path) == "test_scripts.py":
            continue
        assert "sys.path" not in text and "PYTHONPATH" not in text, path


def dry_run(script, out, *args, **env):
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(out), **env}, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def stage_commands(printed):
    return [(m.group(1), shlex.split(m.group(2))) for m in map(STAGE.match, printed.splitlines()) if m]


def test_quickstart_dry_run_trains_each_row_once(tmp_path, monkeypatch):
    printed = dry_run("quickstart.sh", tmp_path)
    commands = stage_commands(printed)
    assert [stage for stage, _ in commands] == ["distill", "evaluate"]  # one evaluate.py run: set and random rows
    assert "--baseline" not in commands[1][1] and "--syn_path" in commands[1][1]
    monkeypatch.chdir(ROOT)
    for stage, argv in commands:
        check_stage_command(stage, argv)
    assert not (tmp_path / "dm").exists()  # a dry run trains nothing


def test_quickstart_prints_both_rows_from_its_one_evaluation(tmp_path):
    def result(mean, std):
        return {"mean": mean, "std": std, "accs": [mean - std, mean + std]}

    blob = {"ConvNet": result(0.7984, 0.0001),
            "comparison": {"rows": [{"kind": "synthetic", "results": {"ConvNet": result(0.7984, 0.0001)}},
                                    {"kind": "random", "results": {"ConvNet": result(0.7544, 0.0005)}}]}}
    (tmp_path / "eval_dm.json").write_text(json.dumps(blob))
    printed = dry_run("quickstart.sh", tmp_path)
    assert re.search(r"DM \(distilled\)\s+79\.84 ± 0\.01\s+2", printed), printed
    assert re.search(r"random real images\s+75\.44 ± 0\.05\s+2", printed), printed
    assert "difference: +4.40 points" in printed


def test_fmnist_cpu_table_lists_every_group_it_knows():
    text = open(os.path.join(ROOT, "scripts", "fmnist_cpu_table.sh")).read()
    labels = set(re.findall(r"^    ([a-z]+)\)", text, re.M))
    assert len(FMNIST_GROUPS) >= 10 and set(FMNIST_GROUPS) == labels, (FMNIST_GROUPS, labels)


@pytest.mark.parametrize("group", FMNIST_GROUPS)
def test_fmnist_cpu_table_dry_run_commands_parse(group, tmp_path, monkeypatch):
    commands = stage_commands(dry_run("fmnist_cpu_table.sh", tmp_path, group))
    assert commands
    monkeypatch.chdir(ROOT)
    for stage, argv in commands:
        check_stage_command(stage, argv)
        if stage == "distill" and argv[argv.index("--method") + 1] in ("random", "herding", "kcenter"):
            assert "--Iteration" not in argv  # coresets refuse it


def test_fmnist_cpu_table_ncfm_trains_every_row_under_one_student_protocol(tmp_path):
    commands = stage_commands(dry_run("fmnist_cpu_table.sh", tmp_path, "ncfm"))
    stages = [stage for stage, _ in commands]
    assert stages[0] == "train_original" and stages.count("distill") == 4 and stages.count("evaluate") == 4
    protocol = ["--optimizer", "adamw", "--adamw_schedule", "multistep", "--mix_type", "cutmix", "--mix_p", "0.5"]
    for stage, argv in commands:
        if stage == "train_original":
            continue
        method = argv[argv.index("--method") + 1] if "--method" in argv else "random"
        if method != "NCFM":  # NCFM's protocol is its default; DM and random real name it
            assert " ".join(protocol) in " ".join(argv), argv
        if method == "NCFM":
            assert argv[argv.index("--pretrain_dir") + 1].endswith("ncfm_pool")
        if method == "random" and "_ncfm_f2" in argv[argv.index("--out") + 1]:
            assert argv[argv.index("--decode_factor") + 1] == "2"


def test_fmnist_cpu_table_mtt_runs_what_results_md_reports(tmp_path):
    commands = stage_commands(dry_run("fmnist_cpu_table.sh", tmp_path, "mtt"))
    for stage, argv in commands:
        if stage == "distill":
            assert argv[argv.index("--Iteration") + 1] == "60" and argv[argv.index("--lr_img") + 1] == "1000"


def test_fmnist_cpu_table_prints_the_table_of_finished_cells(tmp_path):
    for name, method, ipc in (("dc_ipc1", "DC", 1), ("dsa_ipc1", "DSA", 1), ("dm_ipc10", "DM", 10)):
        (tmp_path / name).mkdir()
        results = {"method": method, "ipc": ipc, "iterations": 50, "seconds_per_iteration": 1.5,
                   "accuracy": {"ConvNet": {"mean": 0.6736, "std": 0.0042}},
                   "protocol": {"ConvNet": {"epochs": 300, "augmentation": "none"}}}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        (tmp_path / name / "random.json").write_text(json.dumps({"ConvNet": {"mean": 0.5356, "std": 0.0245}}))
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fmnist_cpu_table.sh"), "core"], capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| 67.36 ± 0.42 | 53.56 ± 2.45 | +13.80 | 1.50 |") == 3, done.stdout


def write_fashion_miniature(root, per_class=20, test_per_class=5):
    """Fashion-MNIST's four IDX files (gzip) of a generated 28x28 ten-class miniature under ``root``:
    class c is noise brightened by 19·c, so a network can learn something in one epoch."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for prefix, count in (("train", per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), count).astype(np.uint8)
        images = (rng.integers(0, 60, size=(len(labels), 28, 28)) + 19 * labels[:, None, None]).astype(np.uint8)
        for name, blob in ((f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 0x803, len(labels), 28, 28) + images.tobytes()),
                           (f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 0x801, len(labels)) + labels.tobytes())):
            with open(os.path.join(root, f"{name}.gz"), "wb") as handle:
                handle.write(gzip.compress(blob))
    return root


def run_side_by_side(runs, cwd, timeout=1800):
    """Start each ``(argv, env)`` of ``runs`` at once, one thread each (``OMP_NUM_THREADS=1``: two
    processes fill the 2 cores without their OpenMP threads waiting for each other), and wait for
    all; returns their ``subprocess.CompletedProcess`` in order."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(cwd),
                              env={**env, "OMP_NUM_THREADS": "1"}) for argv, env in runs]
    outputs = [proc.communicate(timeout=timeout) for proc in procs]  # sets each returncode
    return [subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            for proc, (stdout, stderr) in zip(procs, outputs)]


# --dry's groups in two independent halves, each under its own OUT (baselines needs core and originals).
DRY_HALVES = (("core", "originals", "baselines", "kip"), ("cafe", "datadam", "mtt", "ncfm", "dd", "frepo"))


def test_fmnist_cpu_table_dry_alone_names_every_group(tmp_path):
    """``--dry`` with no group is every group: under DRY_RUN its printed commands reach each one."""
    printed = dry_run("fmnist_cpu_table.sh", tmp_path, "--dry")
    commands = stage_commands(printed)
    runs = {argv[argv.index("--run_dir") + 1].rsplit("/", 1)[-1] for stage, argv in commands if "--run_dir" in argv}
    for name in ("dc_ipc1", "cafe_ipc1", "datadam_ipc1", "mtt_ipc1", "dc_clom_ipc1", "ncfm_ipc1", "herding_ipc1",
                 "kip_ipc1", "dd_ipc1", "frepo_ipc1"):  # one cell of each group
        assert name in runs, (name, sorted(runs))
    assert all("--Iteration" not in argv or argv[argv.index("--Iteration") + 1] == "1" for _, argv in commands)
    assert sorted(FMNIST_GROUPS) == sorted(DRY_HALVES[0] + DRY_HALVES[1])


def test_fmnist_cpu_table_dry_runs_every_group(tmp_path):
    """``--dry``: every group of the driver runs for real on tiny settings (1 iteration, 1 network, 1
    epoch) and a generated miniature, from another working directory, writing only under OUT; then
    the cells' table and the kip/dd/frepo table are printed from what the runs wrote. The two
    independent halves of the groups run side by side, one thread each, to halve the wall time."""
    root_before = sorted(os.listdir(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("TINY", "DATA_PATH")}
    halves = run_side_by_side([(["bash", os.path.join(ROOT, "scripts", "fmnist_cpu_table.sh"), "--dry", *groups],
                                {**env, "OUT": str(tmp_path / f"out{k}")}) for k, groups in enumerate(DRY_HALVES)],
                              tmp_path)
    for half in halves:
        assert half.returncode == 0, half.stdout[-3000:] + half.stderr[-3000:]
        assert "(continuing)" not in half.stderr, half.stderr[-3000:]  # no assessment step failed quietly
    stdout = "".join(half.stdout for half in halves)
    for k in (0, 1):
        assert (tmp_path / f"out{k}" / "data" / "FashionMNIST" / "raw").is_dir()  # the generated miniature
    out0, out1 = tmp_path / "out0", tmp_path / "out1"
    cells = {}
    for text in re.findall(r"cell (\w+)\s+(\w+)\s+(\d+)\s+\S+\s+\S+\s+(\S+)",
                           open(os.path.join(ROOT, "scripts", "fmnist_cpu_table.sh")).read()):
        name, method, _, iterations = text
        if "$" not in name:
            cells[name] = (method, 0 if iterations == "-" else 1)
    cells.update({f"{m}_ipc{ipc}": (m, 0) for m in ("random", "herding", "kcenter") for ipc in (1, 10)})
    cells.update({f"ncfm_ipc{ipc}": ("NCFM", 1) for ipc in (1, 10)})
    cells.update({f"dm_ncfm_ipc{ipc}": ("DM", 1) for ipc in (1, 10)})
    assert len(cells) == 30, sorted(cells)
    for name, (method, iterations) in cells.items():
        found = [out / name for out in (out0, out1) if (out / name / "results.json").is_file()]
        assert len(found) == 1, name  # in the half that ran its group, once
        results = json.loads((found[0] / "results.json").read_text())
        assert results["method"] == method and results["iterations"] == iterations, name
        model = next(iter(results["accuracy"]))
        assert 0 <= results["accuracy"][model]["mean"] <= 1 and (found[0] / "random.json").is_file(), name
    rows = [line for line in stdout.splitlines() if re.match(r"^\| [A-Za-z]+ \| (1|10) \| [01] \|", line)]
    assert len(rows) == 30, stdout[-3000:]
    # kip, dd, frepo: each set and random real images under its own protocol, tabled by defaults_table.py
    for name in ("kip_ipc1", "kip_ipc10", "dd_ipc1", "dd_ipc10", "frepo_ipc1", "frepo_ipc10"):
        report = json.loads(next(out / name / "eval.json" for out in (out0, out1) if (out / name).is_dir()).read_text())
        kinds = {row["kind"] for row in report["comparison"]["rows"]}
        assert {"synthetic", "random"} <= kinds, (name, kinds)
    assert len(re.findall(r"^\| (KIP|DD|FRePo) +\| ConvNet(NN)? +\| 1 ", stdout, re.M)) == 6, stdout[-3000:]
    cross = json.loads((out0 / "crossarch_dsa_ipc1.json").read_text())
    assert {"MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"} <= set(cross), sorted(cross)
    assert (out0 / "continual" / "cl5_dm_ipc10.json").is_file() and (out0 / "tables" / "table.md").is_file()
    assert (out0 / "cost_M.json").is_file() and list(out0.glob("*/res_*_assess.json"))
    assert (out1 / "buffers").is_dir() and (out1 / "ncfm_pool").is_dir() and (out0 / "pretrained_model").is_dir()
    assert sorted(os.listdir(ROOT)) == root_before  # nothing written beside the code


@pytest.fixture(scope="module")
def tiny_tables(tmp_path_factory):
    """The soft-label ``ipc1`` table and a defaults sweep over DM, SRe2L, RDED and MTT, both under
    ``TINY=1`` on one generated miniature, run side by side (one thread each, independent OUT
    folders) to halve the wall time; returns ``{name: (finished process, OUT)}``."""
    root = tmp_path_factory.mktemp("tiny_tables")
    data = write_fashion_miniature(str(root / "data"), per_class=40)
    runs = {"soft": (["soft_label_table.sh", "ipc1"], {}),
            "sweep": (["defaults_sweep.sh"], {"METHODS": "DM SRe2L RDED MTT"})}
    done = run_side_by_side([(["bash", os.path.join(ROOT, "scripts", argv[0]), *argv[1:]],
                              {**os.environ, "TINY": "1", "DATA_PATH": data, "OUT": str(root / name), "THREADS": "1",
                               **extra}) for name, (argv, extra) in runs.items()], root, timeout=1200)
    return {name: (finished, root / name) for name, finished in zip(runs, done)}


def test_soft_label_table_tiny_runs_its_ipc1_table(tiny_tables):
    """``TINY=1``: the ipc-1 table's every step (teacher, whole-dataset model, the four sets, one
    evaluation under three label regimes with ARS) runs for real on a generated miniature."""
    done, out = tiny_tables["soft"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("sre2l_ipc1", "cda_ipc1", "rded_ipc1", "dm_ipc1"):
        assert (out / name / "results.json").is_file(), name
    table = json.loads((out / "table_ipc1.json").read_text())
    regimes = {row.get("labels") for row in table["comparison"]["rows"]}
    assert {"hard", "soft", "teacher"} <= regimes, regimes
    assert not (out / "table_ipc10.json").exists()  # one table asked, one table made


def test_defaults_sweep_tiny_runs_each_kind_of_prerequisite(tiny_tables):
    """``TINY=1`` on a generated miniature: methods needing nothing, a teacher (SRe2L, RDED) and
    expert trajectories (MTT) each distil and are evaluated under their recorded protocols, and the
    table has a row each (the other methods' commands are checked by the dry run above)."""
    done, out = tiny_tables["sweep"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (out / "failed.txt").exists(), (out / "failed.txt").read_text()
    for method in ("DM", "SRe2L", "RDED", "MTT"):
        assert (out / f"{method}_ipc1" / "eval.json").is_file(), method
        assert re.search(rf"^\| {method} ", done.stdout, re.M), done.stdout[-3000:]


MACHINE_PATH = re.compile(r"""(?:^|["' (=])/(?:tmp|home|work|root|Users|mnt|scratch)/""", re.M)
SOURCE_DIRS = ("cli", "configs", "data", "docs", "methods", "pretrained", "scripts", "sets", "tests", "evaluation")


def test_no_machine_paths_in_the_sources_and_docs():
    paths = [os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith((".py", ".md", ".toml", ".txt"))]
    for folder in SOURCE_DIRS:
        for where, _, names in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.join(where, n) for n in names if n.endswith((".py", ".md", ".json", ".yaml", ".sh",
                                                                           ".sbatch", ".csv"))]
    assert len(paths) > 50
    for path in paths:
        with open(path, errors="replace") as handle:
            found = MACHINE_PATH.search(handle.read())
        assert found is None, f"{os.path.relpath(path, ROOT)}: a machine path {found.group(0).strip()}..."


def test_soft_label_table_dry_run_evaluates_every_set_under_three_regimes(tmp_path, monkeypatch):
    commands = stage_commands(dry_run("soft_label_table.sh", tmp_path))
    monkeypatch.chdir(ROOT)
    for stage, argv in commands:
        check_stage_command(stage, argv)
    stages = [stage for stage, _ in commands]
    assert stages.count("train_original") == 2 and stages.count("evaluate") == 2  # teacher + HLR row; ipc 1 and 10
    methods = [argv[argv.index("--method") + 1] for stage, argv in commands if stage == "distill"]
    assert sorted(set(methods)) == ["CDA", "DM", "RDED", "SRe2L"] and len(methods) == 8
    for stage, argv in commands:
        if stage == "evaluate":
            regimes = argv[argv.index("--label_regimes") + 1:argv.index("--label_regimes") + 4]
            assert regimes == ["hard", "soft", "teacher"] and "--random_baseline" in argv
            assert argv[argv.index("--optimizer") + 1] == "adamw" and "--teacher_model" in argv
    assert not list(tmp_path.glob("*/results.json"))  # a dry run trains nothing


def test_defaults_sweep_dry_run_runs_every_method_with_defaults_and_replays_each_protocol(tmp_path, monkeypatch):
    commands = stage_commands(dry_run("defaults_sweep.sh", tmp_path))
    monkeypatch.chdir(ROOT)
    for stage, argv in commands:
        check_stage_command(stage, argv)
    distilled = [argv[argv.index("--method") + 1] for stage, argv in commands if stage == "distill"]
    registered = set(methods.list_methods()) - {"random", "herding", "kcenter", "forgetting"}
    # every distillation method once, but NCFM (its recorded 2000-epoch protocol is left to its own table)
    assert sorted(distilled) == sorted(registered - {"NCFM"})
    ncfm = stage_commands(dry_run("defaults_sweep.sh", tmp_path / "ncfm", METHODS="NCFM"))
    assert [argv[argv.index("--method") + 1] for stage, argv in ncfm if stage == "distill"] == ["NCFM"]
    shared = {"--lr_img", "--lr_net", "--batch_real", "--batch_train", "--init", "--dsa_strategy", "--model",
              "--zca", "--syn_steps", "--expert_lr", "--lr_teacher"}
    for stage, argv in commands:
        if stage == "distill":  # defaults: no shared hyper-parameter is given
            assert not shared & set(argv), argv
        if stage == "evaluate":  # the recorded protocol: no protocol flag
            assert "--random_baseline" in argv and "--syn_path" in argv
            assert not {"--epoch_eval_train", "--dsa_strategy", "--optimizer", "--lr_net", "--labels"} & set(argv)
    evaluated = [argv for stage, argv in commands if stage == "evaluate"]
    assert len(evaluated) == len(distilled)
    assert not [a for a in evaluated if {"--norm_stats", "--zca"} & set(a)]  # taken from the sets' records
    assert not list(tmp_path.glob("*/results.json"))  # a dry run trains nothing


def test_defaults_sweep_iters_sets_a_methods_budget(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "defaults_sweep.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "METHODS": "DD DC",
                               "ITERS": "DD:3000 RaT-BPTT:200"}, timeout=120, cwd=ROOT)
    budgets = {argv[argv.index("--method") + 1]: argv[argv.index("--Iteration") + 1]
               for stage, argv in stage_commands(done.stdout) if stage == "distill"}
    assert budgets == {"DD": "3000", "DC": "20"}


def test_defaults_sweep_records_a_failed_step_and_goes_on(tmp_path):
    # A stand-in python3 on PATH: distill.py of DC fails, every other stage writes what the sweep
    # checks for; the table is made by the real interpreter.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f"""#!/usr/bin/env bash
case "$*" in
  *defaults_table.py*) exec {sys.executable} "$@" ;;
  *distill.py*--method\\ DC\\ *) exit 5 ;;
esac
prev=""
for a in "$@"; do
  [ "$prev" = --run_dir ] && mkdir -p "$a" && echo {{}} > "$a/results.json"
  [ "$prev" = --out ] && echo {{}} > "$a"
  prev=$a
done
""")
    (shim / "python3").chmod(0o755)
    out = tmp_path / "sweep"
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "defaults_sweep.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "METHODS": "DC DM", "PATH": f"{shim}:{os.environ['PATH']}"},
                          timeout=120, cwd=ROOT)
    assert "distill of DC failed (exit 5); going on" in done.stderr, done.stderr[-2000:]
    assert (out / "failed.txt").read_text().split() == ["DC", "distill", "5"]
    assert (out / "DM_ipc1" / "eval.json").is_file()  # the sweep went on to DM
    assert "DC" in done.stdout and "distill failed (exit 5)" in done.stdout


def test_defaults_table_reads_each_eval_and_says_whether_the_set_beats_random(tmp_path, capsys):
    from scripts import defaults_table

    def result(mean, std):
        return {"mean": mean, "std": std, "accs": [mean - std, mean + std],
                "protocol": {"epochs": 300, "optimizer": "SGD", "augmentation": "none", "lr": 0.01}}

    for name, (syn, rand) in {"DC_ipc1": ((0.60, 0.01), (0.50, 0.02)), "DM_ipc1": ((0.51, 0.01), (0.50, 0.02)),
                              "FRePo_ipc1": ((0.36, 0.01), (0.52, 0.01))}.items():
        run = tmp_path / name
        run.mkdir()
        rows = [{"kind": "synthetic", "method": name.split("_")[0], "labels": "hard", "augmented": True,
                 "results": {"ConvNet": result(*syn)}},
                {"kind": "random", "labels": "hard", "augmented": True, "results": {"ConvNet": result(*rand)}}]
        (run / "eval.json").write_text(json.dumps({"comparison": {"models": ["ConvNet"], "rows": rows}}))
        (run / "results.json").write_text(json.dumps({"config": {"iterations": 20}}))
    # A soft-label method: its row is the one of the label regime recorded with its protocol.
    run = tmp_path / "SRe2L_ipc1"
    run.mkdir()
    rows = [{"kind": kind, "method": "SRe2L", "labels": labels, "augmented": True,
             "results": {"ConvNet": result(mean, 0.01)}}
            for kind, labels, mean in [("synthetic", "hard", 0.13), ("synthetic", "soft", 0.70),
                                       ("random", "hard", 0.50), ("random", "soft", 0.65)]]
    (run / "eval.json").write_text(json.dumps({"comparison": {"models": ["ConvNet"], "rows": rows}}))
    (run / "results.json").write_text(json.dumps({"config": {"iterations": 1000},
                                                  "protocol": {"ConvNet": {"label_regime": "soft"}}}))
    # failed.txt: a method without a result gets a row saying which step failed; one with a result keeps it.
    (tmp_path / "failed.txt").write_text("KIP evaluate 3\nDC distill 1\n")
    assert defaults_table.main([str(tmp_path)]) == 0
    lines = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "evaluate failed (exit 3)" in lines["KIP"] and "failed" not in lines["DC"]
    assert "70.00 ± 1.00" in lines["SRe2L"] and "+5.00" in lines["SRe2L"] and "above random" in lines["SRe2L"]
    assert "above random" in lines["DC"] and "+10.00" in lines["DC"] and "60.00 ± 1.00" in lines["DC"]
    assert "within noise" in lines["DM"] and "below random" in lines["FRePo"] and "-16.00" in lines["FRePo"]
    assert defaults_table.main([str(tmp_path / "missing")]) == 1
