"""Mutation testing of the core modules with mutmut: kill rate per module and every survivor.

A mutant is a copy of the code with one small change (``<`` for ``<=``, ``+`` for ``-``, a
constant changed, an argument dropped ...). The fast unit tests of that module run against each
mutant; a mutant that no test notices "survives" and points at behaviour that nothing pins. Each
module is mutated in its own scratch copy of the project under ``data/mutation/<module>/`` and
tested with its own test files only (no Kedro subprocess tests), so one module takes minutes
rather than the whole suite per mutant. Not part of CI (tens of minutes on 2 CPU cores).

    pip install -e ".[mutation]"
    python benchmarks/mutation.py                        # every module below, fresh
    python benchmarks/mutation.py metrics ensembles      # some of them
    python benchmarks/mutation.py --resume metrics       # reuse mutmut's cache: only mutants of
                                                         # changed functions and earlier survivors
    python benchmarks/mutation.py --children 4           # parallel mutant workers (default 2)

Kill rate = (killed + timeout) / mutants: a mutant that makes a test hang is detected. Mutants
in code that no selected test executes ("no tests") count as survivors. The table and the
survivors (file:line and the changed line) are printed and written to
``data/08_reporting/mutation.md``; equivalent survivors are explained in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cimd_pipeline"
log = logging.getLogger("mutation")

# module -> (files mutated, relative to src/cimd_pipeline; the fast unit tests that pin them, as
# pytest arguments: "--deselect" drops a Kedro subprocess test from a file of unit tests)
MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "metrics": (("metrics.py",), ("tests/test_metrics.py", "tests/test_metrics_inputs.py",
                                  "tests/test_metrics_agreement.py", "tests/test_ged_floor.py")),
    "scoring": (("scoring.py", "uncertainty.py"), ("tests/test_scoring.py", "tests/test_uncertainty.py")),
    "ensembles": (
        ("ensembles.py", "sample_rows.py", "diffusion/noise.py"),  # the per-image noise streams are pinned by the ensemble tests
        # the two-process test spawns workers per mutant (minutes each under mutmut's forks); a
        # progress bar drawn in a forked mutant run waits on a lock for ever (measured: every
        # mutant of the tqdm line ran into mutmut's timeout), so its mutants count as survivors
        ("tests/test_ensembles.py", "--deselect", "tests/test_ensembles.py::test_two_processes_give_bit_identical_samples",
         "--deselect", "tests/test_ensembles.py::test_progress_counts_every_mask"),
    ),
    "ambiguity": (
        ("models/ambiguity.py",),
        ("tests/models/test_ambiguity.py", "tests/models/test_ambiguity_edges.py"),
    ),
    "cimd": (
        ("models/cimd.py",),
        ("tests/models/test_cimd.py", "tests/models/test_training_targets.py", "tests/models/test_cimd_recipe.py",
         "tests/models/test_cimd_latent.py", "--deselect", "tests/models/test_cimd_latent.py::"
         "test_cimd_latent_with_the_literature_recipe_runs_the_kedro_chain_and_the_probe"),
    ),
    "diffusion": (
        ("diffusion/__init__.py", "diffusion/losses.py", "diffusion/respace.py",
         "diffusion/samplers.py", "diffusion/schedule.py", "diffusion/weighting.py"),
        ("tests/diffusion",),
    ),
    "loop": (("training/loop.py",), ("tests/training/test_loop.py", "tests/training/test_loop_reports.py",
                                   "tests/training/test_resume_rules.py")),
    "alignment": (
        ("data/alignment.py", "data/aligned_files.py"),
        ("tests/data/test_alignment.py", "tests/data/test_aligned_files.py"),
    ),
    "fingerprint": (("training/fingerprint.py", "training/augment.py"),
                    ("tests/training/test_fingerprint.py", "tests/training/test_augment.py")),
}
# Detected: the tests failed (killed, pytest error), ran past mutmut's limit (timeout) or crashed.
DETECTED = {"killed", "timeout", "segfault", "suspicious", "caught by type check"}


@dataclass
class Survivor:
    """One mutant that no test noticed: where it is and what it changed."""

    name: str
    status: str
    where: str
    before: str
    after: str


@dataclass
class ModuleResult:
    """Counts of one module's mutants by mutmut status, its survivors and the wall time."""

    module: str
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def detected(self) -> int:
        return sum(n for status, n in self.counts.items() if status in DETECTED)

    @property
    def kill_rate(self) -> float:
        return self.detected / self.total if self.total else float("nan")


def prepare(workdir: Path, module: str, resume: bool) -> None:
    """A scratch project for mutmut: the package, tests, docs and conf, and a mutmut config."""
    files, tests = MODULES[module]
    if workdir.exists() and not resume:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # mutmut maps each function to the tests that run it once and keeps the map: without this, a
    # resumed run would re-test survivors without the tests written for them since
    (workdir / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "tests", "docs", "conf"):
        if (workdir / name).exists():
            shutil.rmtree(workdir / name)
    shutil.copytree(ROOT / "src" / PACKAGE, workdir / "src" / PACKAGE, ignore=ignore)
    for name in ("tests", "docs", "conf"):
        shutil.copytree(ROOT / name, workdir / name, ignore=ignore)
    shutil.copy(ROOT / "README.md", workdir / "README.md")
    only = ", ".join(f'"src/{PACKAGE}/{f}"' for f in files)
    selection = ", ".join(f'"{t}"' for t in tests)
    (workdir / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{only}]\n"
        f"pytest_add_cli_args_test_selection = [{selection}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
        'also_copy = ["docs", "README.md", "conf"]\n'
        "\n[tool.pytest.ini_options]\n"
        'addopts = "--import-mode=importlib"\n'
    )


def previous_survivors(workdir: Path, module: str) -> list[str]:
    """Names of the mutants in ``workdir`` that no test detected (re-tested on --resume)."""
    names = []
    for meta in meta_files(workdir, module):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += [name for name, code in codes.items() if status_of(code) not in DETECTED]
    return names


def run_mutmut(workdir: Path, children: int, names: list[str]) -> float:
    """``mutmut run`` in ``workdir``; returns the wall time. Output goes to ``mutmut.log``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut sets the path itself
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", KEDRO_DISABLE_TELEMETRY="1")
    started = time.perf_counter()
    with open(workdir / "mutmut.log", "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (workdir / "mutmut.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mutmut failed in {workdir} (exit {proc.returncode}):\n{tail}")
    return seconds


def meta_files(workdir: Path, module: str) -> list[Path]:
    files, _ = MODULES[module]
    return [p for f in files if (p := workdir / "mutants" / "src" / PACKAGE / f"{f}.meta").exists()]


def status_of(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def function_spans(source: str) -> dict[str, tuple[int, int]]:
    """mutmut's mangled function names (``x_f``, ``xǁClassǁmethod``) -> (first, last) line."""
    spans: dict[str, tuple[int, int]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            spans[f"x_{node.name}"] = (node.lineno, node.end_lineno)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    spans[f"xǁ{node.name}ǁ{item.name}"] = (item.lineno, item.end_lineno)
    return spans


def describe(workdir: Path, name: str, status: str, path: str) -> Survivor:
    """file:line and the changed line of mutant ``name`` (mutmut's diff; cwd is ``workdir``)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    before, after = (removed or [""])[0], (added or [""])[0]
    where = path
    lines = (workdir / path).read_text().splitlines()  # the copy that was mutated
    function = name.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    first, last = function_spans("\n".join(lines)).get(function, (1, len(lines)))
    hits = [i + 1 for i in range(first - 1, last) if lines[i].strip() == before.strip()]
    if hits:
        where = f"{path}:{hits[0]}"
    return Survivor(name, status, where.replace(f"src/{PACKAGE}/", ""), before.strip(), after.strip())


def collect(workdir: Path, module: str, seconds: float) -> ModuleResult:
    """Count the module's mutants by status and describe every one that was not detected."""
    from mutmut.configuration import reset_config

    result = ModuleResult(module, seconds=seconds)
    cwd = os.getcwd()
    os.chdir(workdir)  # mutmut reads its config and mutants relative to the working directory
    reset_config()
    try:
        for meta in meta_files(workdir, module):
            path = str(meta.relative_to(workdir / "mutants"))[: -len(".meta")]
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                status = status_of(code)
                result.counts[status] = result.counts.get(status, 0) + 1
                if status not in DETECTED:
                    result.survivors.append(describe(workdir, name, status, path))
    finally:
        os.chdir(cwd)
    return result


def table(results: list[ModuleResult], children: int) -> str:
    lines = [
        "| module | mutants | killed | survived | no tests | timeout | kill rate | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.counts
        lines.append(
            f"| {r.module} | {r.total} | {c.get('killed', 0)} | {c.get('survived', 0)} | "
            f"{c.get('no tests', 0)} | {c.get('timeout', 0)} | {100 * r.kill_rate:.1f} % | {r.seconds / 60:.1f} |"
        )
    total = sum(r.total for r in results)
    detected = sum(r.detected for r in results)
    if total:
        lines.append(f"| **all** | {total} | | | | | {100 * detected / total:.1f} % | "
                     f"{sum(r.seconds for r in results) / 60:.1f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {children} mutant workers"
    return "\n".join(lines) + f"\n\nMachine: {machine}; mutmut {mutmut_version()}.\n"


def mutmut_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mutmut")
    except PackageNotFoundError:
        return "(not installed)"


def survivors_text(results: list[ModuleResult]) -> str:
    out = []
    for r in results:
        for s in r.survivors:
            out.append(f"- {r.module} {s.where} [{s.status}] `{s.before}` -> `{s.after}`")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=2, help="parallel mutant workers (CPU cores)")
    parser.add_argument("--resume", action="store_true",
                        help="keep mutmut's results: re-test changed functions and earlier survivors only")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table of the last run in --workdir without running mutmut")
    parser.add_argument("--workdir", type=Path, default=ROOT / "data" / "mutation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    results = []
    for module in args.modules or list(MODULES):
        workdir = args.workdir / module
        if args.report_only:
            seconds = float((workdir / "seconds.txt").read_text()) if (workdir / "seconds.txt").exists() else 0.0
            results.append(collect(workdir, module, seconds))
            continue
        earlier = 0.0  # a resumed run adds to the time of the run it continues
        if args.resume and (workdir / "seconds.txt").exists():
            earlier = float((workdir / "seconds.txt").read_text())
        prepare(workdir, module, args.resume)
        log.info("%s: mutating %s", module, ", ".join(MODULES[module][0]))
        seconds = run_mutmut(workdir, args.children, [])  # on --resume: changed functions only
        rerun = previous_survivors(workdir, module) if args.resume else []
        if rerun:  # kept survivors of the earlier run, against the current tests
            seconds += run_mutmut(workdir, args.children, rerun)
        seconds += earlier
        (workdir / "seconds.txt").write_text(f"{seconds:.1f}\n")
        result = collect(workdir, module, seconds)
        log.info("%s: %d mutants, kill rate %.1f %% in %.1f min", module, result.total,
                 100 * result.kill_rate, seconds / 60)
        results.append(result)
    report = table(results, args.children) + "\nSurvivors:\n\n" + survivors_text(results) + "\n"
    print(report)
    out = ROOT / "data" / "08_reporting" / "mutation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    log.info("written to %s", out)


if __name__ == "__main__":
    main()
