"""The documentation's claims stay checkable (docs/claims.md):

- every command written in README.md, configs/README.md and docs/*.md (code spans, table cells,
  fenced and indented code) names a script that exists, with only flags that script's parser
  accepts (the stage scripts' parsers as ``scripts/flag_reference.py`` builds them, a
  ``scripts/*.py`` script's own parser), environment variables its driver reads and groups it
  knows;
- every call of a stage script in ``scripts/`` (shell and SLURM scripts) uses only flags that
  stage accepts;
- every section of docs/results.md that holds a table names a command and has a row in
  docs/claims.md, and every registered distillation method has a measured row there.

Everything is found from the repository root, whatever the working directory."""
import argparse
import glob
import os
import re
import runpy
import subprocess
import sys

import pytest

import methods
from conftest import ROOT
from scripts import flag_reference

STAGES = ("distill.py", "evaluate.py", "buffer.py", "train_original.py")
DOCS = sorted(["README.md", os.path.join("configs", "README.md"),
               *(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
                 if os.path.basename(p) != "flags.md")])  # flags.md is generated from the parsers
SHELL = sorted(os.path.relpath(p, ROOT) for folder in ("", "slurm") for ext in ("sh", "sbatch")
               for p in glob.glob(os.path.join(ROOT, "scripts", folder, f"*.{ext}")))
# A script named in a command: a stage script, or anything under scripts/.
SCRIPT = re.compile(r"^(?:\./)?((?:scripts/[\w/.-]+\.(?:py|sh|sbatch))|(?:distill|evaluate|buffer|train_original)\.py)$")
END = {"|", "||", "&&", ";", ">", ">>", "2>&1", "#", "and", "or"}  # what ends a command in a span or line
FLAG = re.compile(r"^\[?(--?[A-Za-z][\w-]*)")
# The drivers of docs/results.md's tables: a lower-case word after one is a group (table) it knows.
TABLE_DRIVERS = ("scripts/fmnist_cpu_table.sh", "scripts/soft_label_table.sh", "scripts/defaults_sweep.sh")


def read(path):
    with open(os.path.join(ROOT, path)) as handle:
        return handle.read()


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parser built")
        self.parser = parser


_OPTIONS = {}


def options(script):
    """The option strings ``script`` (a path relative to the root) accepts: a stage's parser from
    ``flag_reference.parser_builder``; a ``scripts/*.py`` script's, caught when its ``main`` parses."""
    if script not in _OPTIONS:
        if script in STAGES:
            parser = flag_reference.parser_builder(script)()
        else:
            parser = None
            saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv

            def catch(self, *args, **kwargs):
                raise _Parsed(self)

            argparse.ArgumentParser.parse_args = catch
            argparse.ArgumentParser.parse_known_args = catch
            sys.argv = [os.path.join(ROOT, script)]
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except _Parsed as parsed:
                parser = parsed.parser
            finally:
                argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
            assert parser is not None, f"{script} parsed no command line"
        _OPTIONS[script] = {name for action in parser._actions for name in action.option_strings}
    return _OPTIONS[script]


def driver_facts(script):
    """``(variables read, groups)`` of a shell driver: every ``${NAME`` / ``$NAME`` in it and the
    labels of its ``case $group`` branches."""
    text = read(script)
    names = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
    groups = set(re.findall(r"^\s+([a-z][\w-]*)\)", text, re.M))
    return names, groups


def commands_in(text):
    """``(script, words after it, environment names set before it)`` for every script named in
    ``text`` (one span or one line)."""
    words = text.replace("\\\n", " ").split()
    found = []
    for index, word in enumerate(words):
        match = SCRIPT.match(word.strip("`'\"(),"))
        if not match or re.search(r"/[A-Z]+\.\w+$", match.group(1)):  # none, or a placeholder (scripts/NAME.py)
            continue
        before = words[max(0, index - 12):index]
        env = [w.split("=", 1)[0] for w in before if re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        after = []
        for other in words[index + 1:]:
            if other in END or other.startswith("#") or SCRIPT.match(other.strip("`'\"(),")):
                break
            after.append(other)
        found.append((match.group(1), after, env))
    return found


def documented():
    """Every command in the documentation, as pytest params."""
    found = []
    for doc in DOCS:
        text = read(doc)
        pieces = []
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
        for block in fenced:
            pieces += re.sub(r"\\\n\s*", " ", block).splitlines()
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        pieces += [line for line in prose.splitlines() if line.startswith("    ") and not line.lstrip().startswith(("-", "|"))]
        pieces += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose, flags=re.S)]
        for piece in pieces:
            for script, after, env in commands_in(piece):
                found.append(pytest.param(script, after, env, id=f"{doc}: {script} {' '.join(after)[:60]}"))
    return found


DOCUMENTED = documented()


def test_reading_a_scripts_parser_leaves_argparse_whole():
    before = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    _OPTIONS.pop("scripts/make_table.py", None)
    assert "--out_dir" in options("scripts/make_table.py")
    assert (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args) == before
    assert argparse.ArgumentParser().parse_args(["x"][:0]) == argparse.Namespace()


def test_the_documentation_has_commands_of_every_kind():
    scripts = {param.values[0] for param in DOCUMENTED}
    assert set(STAGES) <= scripts and "scripts/fmnist_cpu_table.sh" in scripts and "scripts/bench.py" in scripts
    assert len(DOCUMENTED) >= 100


def check_command(script, after, env):
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script}: no such script"
    if script.endswith(".py"):
        known = options(script)
        for word in after:
            flag = FLAG.match(word)
            if flag and flag.group(1) not in ("-", "--"):
                name = flag.group(1).split("=")[0]
                assert name in known, f"{script} has no flag {name}"
    else:
        names, groups = driver_facts(script)
        for name in env:
            assert name in names, f"{script} reads no variable {name}"
        if script in TABLE_DRIVERS:
            for word in after:
                if re.match(r"^[a-z]+$", word):
                    assert word in groups, f"{script} has no group {word}"


@pytest.mark.parametrize("script,after,env", DOCUMENTED)
def test_documented_command_names_a_script_and_its_flags(script, after, env):
    check_command(script, after, env)


def test_the_check_catches_a_wrong_flag_a_missing_script_and_an_unknown_group():
    with pytest.raises(AssertionError, match="no flag --Iterations"):
        check_command(*commands_in("python3 distill.py --method DM --Iterations 5")[0])
    with pytest.raises(AssertionError, match="no flag --no_such"):
        check_command(*commands_in("python3 scripts/bench.py --cases DC --no_such 1")[0])
    with pytest.raises(AssertionError, match="no such script"):
        check_command(*commands_in("bash scripts/no_such_table.sh core")[0])
    with pytest.raises(AssertionError, match="no group cores"):
        check_command(*commands_in("bash scripts/fmnist_cpu_table.sh cores")[0])
    with pytest.raises(AssertionError, match="no group longer"):
        check_command(*commands_in("bash scripts/defaults_sweep.sh longer")[0])
    check_command(*commands_in("bash scripts/defaults_sweep.sh long")[0])
    check_command(*commands_in("bash scripts/soft_label_table.sh ipc10")[0])
    with pytest.raises(AssertionError, match="reads no variable NO_SUCH_ITERS"):
        check_command(*commands_in("NO_SUCH_ITERS=3 bash scripts/fmnist_cpu_table.sh core")[0])
    assert commands_in("torchrun --nproc_per_node 4 distill.py --method DM | tee log") == \
        [("distill.py", ["--method", "DM"], [])]


def shell_calls():
    found = []
    for script in SHELL:
        lines = re.sub(r"\\\n\s*", " ", read(script)).splitlines()
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("#"):
                continue
            for called, after, _ in commands_in(line):
                if called in STAGES:
                    found.append(pytest.param(called, after, id=f"{script}:{number}: {called}"))
    return found


SHELL_CALLS = shell_calls()


def test_the_scripts_call_every_stage():
    assert {param.values[0] for param in SHELL_CALLS} == set(STAGES)


@pytest.mark.parametrize("stage,after", SHELL_CALLS)
def test_script_calls_a_stage_with_flags_it_accepts(stage, after):
    known = options(stage)
    for word in after:
        flag = FLAG.match(word.strip("\"'"))
        if flag:
            assert flag.group(1) in known, f"{stage} has no flag {flag.group(1)}"


def results_sections():
    """``(heading, anchor, body)`` of every ``##`` / ``###`` section of docs/results.md."""
    from test_readme import github_anchor

    sections = []
    for part in re.split(r"^(?=#{2,3} )", read(os.path.join("docs", "results.md")), flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        sections.append((heading, github_anchor(heading.lstrip("#")), body))
    return sections


SECTIONS = results_sections()
COMMAND = re.compile(r"(?:\b(?:distill|evaluate|buffer|train_original)\.py\b|scripts/\w+\.(?:py|sh))")


def test_results_has_sections():
    assert len(SECTIONS) >= 20


@pytest.mark.parametrize("heading,anchor,body", SECTIONS, ids=[s[1] for s in SECTIONS])
def test_every_results_table_names_its_command_and_is_in_the_ledger(heading, anchor, body):
    if not re.search(r"^\|.*\|\s*$", body, re.M):
        return  # no table in this section
    assert COMMAND.search(body), f"docs/results.md {heading}: a table without the command that made it"
    assert f"(results.md#{anchor})" in read(os.path.join("docs", "claims.md")), \
        f"docs/results.md {heading}: no row in docs/claims.md"


def test_every_distillation_method_has_a_measured_row_and_the_readme_counts_them():
    body = read(os.path.join("docs", "results.md"))
    distilled = [m for m in methods.list_methods() if m not in ("random", "herding", "kcenter", "forgetting")]
    for method in distilled:
        assert re.search(rf"^\| {re.escape(method)}\b", body, re.M), f"{method}: no row in docs/results.md"
    words = {15: "fifteen", 16: "sixteen", 17: "seventeen", 18: "eighteen"}
    assert f"({words[len(distilled)]}," in read("README.md"), "README.md's count of methods run is stale"


def test_fmnist_table_defaults_are_the_published_settings():
    """The NCFM and DataDAM tables of docs/results.md were measured at these budgets."""
    text = read(os.path.join("scripts", "fmnist_cpu_table.sh"))
    for name, value in {"NCFM_POOL": 3, "NCFM_POOL_EPOCHS": 1, "NCFM_ITERS": 50, "NCFM_EPOCHS": 300,
                        "NCFM_NUM_EVAL": 2, "DAM_NUM_EVAL": 2, "DAM_ITERS": 100, "MTT_ITERS": 60,
                        "MTT_LR_IMG": 1000, "DC_ITERS": 50, "DM_ITERS": 100, "CAFE_ITERS": 10, "NUM_EVAL": 3,
                        "EXPERTS": 2, "EXPERT_EPOCHS": 5, "ORIGINAL_EPOCHS": 2, "KIP_ITERS": 300,
                        "KIP_TARGETS": 2000, "KIP_NUM_EVAL": 2, "DD_ITERS_1": 100, "DD_ITERS_10": 10,
                        "FREPO_ITERS_1": 200, "FREPO_ITERS_10": 100}.items():
        assert f"{name}=${{{name}:-{value}}}" in text, name
    results = read(os.path.join("docs", "results.md"))
    assert "\n    bash scripts/fmnist_cpu_table.sh ncfm\n" in results  # the group alone, no budget overrides


def dry_run_commands(script, *args, tmp_path, env=None):
    """The stage commands a driver prints under ``DRY_RUN=1`` (``+ python3 ...`` lines), with the
    temporary ``OUT`` written back as ``result/fmnist_cpu``."""
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), **(env or {})}, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line[2:].replace(str(tmp_path), "result/fmnist_cpu") for line in done.stdout.splitlines()
            if line.startswith("+ python3 ")]


@pytest.mark.parametrize("group", ["kip", "dd", "frepo"])
def test_the_kip_dd_and_frepo_sections_list_exactly_what_their_group_runs(group, tmp_path):
    """docs/results.md's KIP, DD and FRePo sections name ``bash scripts/fmnist_cpu_table.sh GROUP``
    and list its commands: every command the group runs is a line of the section, flags and all."""
    results = read(os.path.join("docs", "results.md")).splitlines()
    commands = dry_run_commands("fmnist_cpu_table.sh", group, tmp_path=tmp_path)
    assert len(commands) == 4 and f"bash scripts/fmnist_cpu_table.sh {group}" in results
    for command in commands:
        assert command in results, command


def test_soft_label_and_defaults_sweep_defaults_are_the_published_settings(tmp_path):
    """No argument and no variable: the settings docs/results.md's soft-label and defaults-sweep
    tables were measured with (ipc 1: 3 students and ARS; ipc 10: 2 students; the sweep: every
    method but NCFM, CAFE 2 iterations, soft_label_table.sh's teacher command; long: DD 3000 and
    RaT-BPTT 200)."""
    soft = dry_run_commands("soft_label_table.sh", tmp_path=tmp_path / "soft")
    evaluations = [c.split() for c in soft if c.startswith("python3 evaluate.py")]
    assert [(e[e.index("--num_eval") + 1], "--ars" in e) for e in evaluations] == [("3", True), ("2", False)]
    sweep = dry_run_commands("defaults_sweep.sh", tmp_path=tmp_path / "sweep")
    distilled = {c.split()[c.split().index("--method") + 1]: c.split() for c in sweep if "distill.py" in c}
    assert "NCFM" not in distilled and len(distilled) == 15
    assert distilled["CAFE"][distilled["CAFE"].index("--Iteration") + 1] == "2"
    teachers = [c for c in sweep if "train_original.py" in c and "ConvNetBN" in c]
    soft_teacher = [c for c in soft if "train_original.py" in c and "ConvNetBN" in c]
    def without_save_path(command):
        words = command.split()
        return words[:words.index("--save_path")] + words[words.index("--save_path") + 2:]
    assert len(set(teachers)) == 1 and without_save_path(teachers[0]) == without_save_path(soft_teacher[0])
    long = dry_run_commands("defaults_sweep.sh", "long", tmp_path=tmp_path / "long")
    budgets = {c.split()[c.split().index("--method") + 1]: c.split()[c.split().index("--Iteration") + 1]
               for c in long if "distill.py" in c}
    assert budgets == {"DD": "3000", "RaT-BPTT": "200"}


def test_reproduce_lists_every_group_of_the_driver_once():
    """docs/reproduce.md's table of fmnist_cpu_table.sh's groups has one row per group of its
    ``ALL_GROUPS``, no more and no less (a group added to the driver must be documented)."""
    script = read(os.path.join("scripts", "fmnist_cpu_table.sh"))
    groups = re.search(r"^ALL_GROUPS=\(([^)]*)\)", script, flags=re.M).group(1).split()
    rows = re.findall(r"^\| `([a-z]+)`(?: \(default\))? \|", read(os.path.join("docs", "reproduce.md")), flags=re.M)
    assert sorted(rows) == sorted(groups), (rows, groups)
