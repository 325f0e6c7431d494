"""Every ``kedro run`` command in README.md and docs/datasets.md works when pasted into bash.

The commands are taken from the documents themselves (bash code blocks, with ``\\`` continuations
joined, and inline code), split with bash's quoting rules and run in document order by Kedro's own
CLI in a temporary project copy (`tests/command_driver.py`). Each dataset folder a command reads
gets a small fixture in that dataset's real layout, written here.

What is changed in the copy, and why: the documented commands train for thousands of steps and
sample hundreds of masks, minutes to hours of CPU time each. The copy therefore gets the tiny
model/training/sampling/evaluation/inference sizes of ``conf/test`` in ``conf/local`` (which the
default environment reads over ``conf/base``) and merged into the training and sampling blocks of
each dataset environment. Ingestion and alignment parameters are never changed: those stages run
exactly as documented, and their output is checked per layout.

Commands that are not ``kedro run`` are listed in `SKIPPED` with the reason; an unknown one fails
the test so that it gets a decision.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import PROJECT, make_project_copy
from tests.data.readers.test_folders import cimd_authors_tree
from tests.data.readers.test_lidc_slices import write_slice_tree
from tests.data.readers.test_rater_folders import write_set
from tests.pipelines.test_real_datasets import write_folders, write_lidc, write_msmri, write_qubiq

pytestmark = pytest.mark.slow

DOCS = ("README.md", "docs/datasets.md")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
SKIPPED = {
    ("python", "-m", "pip"): "installs the project (CI does this before the tests)",
    ("python", "-m", "pytest"): "runs this test suite",
    ("mlflow", "ui"): "a server; tests/reliability/test_mlflow_ui.py opens it in headless Chromium",
    ("jupyter", "nbconvert"): "executes the notebook; tests/test_notebook.py runs it",
    ("kedro", "viz"): "the pipeline graph; tests/test_kedro_viz.py builds it",
    ("python", "benchmarks/"): "benchmark scripts; tests/test_benchmarks.py runs each on tiny settings",
    ("git", "-C"): "extracts the public LIDC slice tree from its repository (data is never downloaded)",
    ("tar", "-x"): "the other half of that extraction",
    ("cimd-pipeline", "evaluate"): "the evaluator without Kedro; tests/test_evaluate.py runs it on an "
    "LIDC slice tree it writes",
}
# `kedro run` commands that are parsed by Kedro's own `run` command (its --params YAML included)
# but not run here, with the reason
PARSED_ONLY = {
    "training.num_processes=": "spawns one training process per GPU (four on a 2-core CPU take minutes); "
    "tests/training/test_distributed.py runs the data-parallel path",
}
TINY_BLOCKS = ("model", "training", "sampling", "evaluation", "inference")
# even smaller than conf/test: two dozen runs share the test's time budget
SMALLER = {
    "ingestion": {"synthetic": {"num_cases": 16}},
    "model": {"unet": {"attention_levels": [False, False]}},  # no attention on 64x64 grids
    "training": {"max_steps": 2, "checkpoint_every": 2, "log_every": 2},
    "sampling": {"num_samples": 2, "steps": 2, "max_cases": 2},
    "evaluation": {"figure_cases": 1},
    "inference": {"num_samples": 2, "steps": 2, "progress": False},
}


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell code blocks and ``kedro run`` in inline code (which may wrap
    onto the next line of its paragraph), in document order."""
    lines, fence, pending, paragraph = [], None, "", []
    for line in [*text.splitlines(), ""]:
        if fence is None and not line.startswith("```") and line.strip():
            paragraph.append(line.strip())
            continue
        lines += re.findall(r"`(kedro run[^`]*)`", " ".join(paragraph))
        paragraph = []
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in SHELL_BLOCKS:
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip() + " "
                continue
            lines.append(pending)
            pending = ""
    return lines


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one line (``a && b; c``), as bash splits their words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [w for w in [*commands, words] if w]


def documented_commands() -> tuple[list[str], dict[str, str]]:
    """(``kedro run`` commands in document order without repeats, {skipped command: reason})."""
    runs: list[str] = []
    skipped: dict[str, str] = {}
    for doc in DOCS:
        for line in shell_lines((PROJECT / doc).read_text()):
            for words in split_commands(line):
                command = shlex.join(words)
                if words[:2] == ["kedro", "run"]:
                    runs += [] if command in runs else [command]
                    continue
                reasons = [r for key, r in SKIPPED.items() if _starts(words, key)]
                assert reasons, f"{doc}: no decision for the command {command!r} (add it to SKIPPED)"
                skipped[command] = reasons[0]
    return runs, skipped


def _starts(words: list[str], key: tuple[str, ...]) -> bool:
    return len(words) >= len(key) and all(w.startswith(k) for w, k in zip(words, key))


def _params(command: str) -> dict[str, str]:
    words = shlex.split(command)
    if "--params" not in words:
        return {}
    value = words[words.index("--params") + 1]
    return dict(item.split("=", 1) for item in value.split(","))


def _env(command: str) -> str | None:
    words = shlex.split(command)
    return words[words.index("--env") + 1] if "--env" in words else None


# fixtures: the folder a command reads -> a writer of that dataset's layout
def write_flat_pngs(root: Path) -> None:
    """``<id>.png`` + ``<id>_l0.png`` ... in one folder, no images/ or gt/."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:32, :32]
    for k in range(6):
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(root / f"{k:04d}.png")
        for rater in range(4):
            disk = ((yy - 16) ** 2 + (xx - 16) ** 2 < (3 + rater) ** 2).astype(np.uint8) * 255
            Image.fromarray(disk).save(root / f"{k:04d}_l{rater}.png")


def write_bone_us(root: Path) -> None:
    """``patient<k>_scan<j>/image.png`` + ``rater1.png`` ... ``rater4.png``, RGB scans."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:24, :30]
    for patient in range(3):
        for scan in range(2):
            folder = root / f"patient{patient}_scan{scan}"
            folder.mkdir(parents=True)
            Image.fromarray((rng.random((24, 30, 3)) * 255).astype(np.uint8)).save(folder / "image.png")
            for rater in range(1, 5):
                line = (np.abs(yy - 12 - rater) < 2) & (xx > 4 * patient)
                Image.fromarray(line.astype(np.uint8) * 255).save(folder / f"rater{rater}.png")


FIXTURES = {
    "data/01_raw/lidc": write_lidc,
    "data/01_raw/lidc_copy": write_lidc,
    "data/01_raw/LIDC-IDRI-slices": lambda root: write_slice_tree(root, patients=6, slices=(0, 1)),
    "data/01_raw/folders": write_folders,
    "data/01_raw/flat_pngs": write_flat_pngs,
    "data/01_raw/cimd": cimd_authors_tree,
    "data/01_raw/bone_us": write_bone_us,
    "data/01_raw/bubil": lambda root: write_set(root, invert=True),
    "data/01_raw/msmri": write_msmri,
    "data/01_raw/qubiq": write_qubiq,
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def tiny_project(target: Path, commands: list[str]) -> Path:
    """A project copy with tiny model/training/sampling sizes and a fixture per dataset folder."""
    project = make_project_copy(target)
    shutil.copytree(PROJECT / "examples", project / "examples")
    tiny = _merge(yaml.safe_load((PROJECT / "conf/test/parameters.yml").read_text()), SMALLER)
    (project / "conf/local/parameters.yml").write_text(yaml.safe_dump(tiny))
    blocks = {k: tiny[k] for k in TINY_BLOCKS}
    for env in sorted({_env(c) for c in commands} - {None, "local"}):
        _shrink_environment(project / "conf" / env, blocks)
    for command in commands:
        root = _params(command).get("ingestion.root")
        env = _env(command)
        if root is None and env not in (None, "test", "local"):
            root = f"data/01_raw/{env}"
        if root is not None and not (project / root).exists():
            assert root in FIXTURES, f"no fixture for {root} (command {command!r}); add one to FIXTURES"
            FIXTURES[root](project / root)
    return project


def _shrink_environment(folder: Path, blocks: dict) -> None:
    """Merge the tiny blocks into the environment file that holds each block (Kedro refuses a
    key defined in two files of one environment), or into a new file."""
    files = {p: yaml.safe_load(p.read_text()) or {} for p in sorted(folder.glob("parameters*.yml"))}
    for block, values in blocks.items():
        holder = next((p for p, content in files.items() if block in content), folder / f"parameters_{block}.yml")
        content = files.setdefault(holder, {})
        content[block] = _merge(content.get(block) or {}, values)
    for path, content in files.items():
        path.write_text(yaml.safe_dump(content))


def _pipelines(command: str) -> set[str]:
    words = shlex.split(command)
    for flag in ("--pipelines", "--pipeline"):
        if flag in words:
            return set(words[words.index(flag) + 1].split(","))
    return {"__default__"}


def parsed_by_kedro(command: str) -> dict:
    """Kedro's ``run`` command parses ``command`` (callbacks included) without running it."""
    from kedro.framework.cli.project import run

    with run.make_context("run", shlex.split(command)[2:]) as context:
        return context.params


def test_documented_commands_run_when_pasted(tmp_path: Path):
    commands, skipped = documented_commands()
    parsed_only = [c for c in commands if any(key in c for key in PARSED_ONLY)]
    for command in parsed_only:
        assert parsed_by_kedro(command)["params"], command
    commands = [c for c in commands if c not in parsed_only]
    assert len(commands) >= 15, commands
    assert {"python -m pytest -q", "mlflow ui --backend-store-uri sqlite:///mlflow.db"} <= set(skipped)
    layouts = {"data/01_raw/cimd", "data/01_raw/bone_us", "data/01_raw/bubil", "data/01_raw/flat_pngs"}
    assert layouts <= {_params(c).get("ingestion.root") for c in commands}, "a layout lost its command"

    project = tiny_project(tmp_path / "project", commands)
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    driver = Path(__file__).with_name("command_driver.py")
    proc = subprocess.run(
        [sys.executable, str(driver), str(project), str(tmp_path / "commands.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((tmp_path / "out.json").read_text())
    failed = [f"{r['command']}\n{r['error']}" for r in results if r["error"]]
    assert not failed, "\n\n".join(failed)

    previous = None
    for result in results:
        aligned = result["aligned"]
        if _pipelines(result["command"]) & {"mask_alignment", "__default__"}:
            assert aligned and aligned != previous, f"{result['command']} wrote no aligned set"
            _check_layout(result["command"], aligned)
        previous = aligned


def _check_layout(command: str, aligned: dict) -> None:
    """What each documented layout must produce: given splits kept, raters kept apart."""
    root = _params(command).get("ingestion.root")
    split_of = aligned["case_split"]
    if root == "data/01_raw/cimd":  # training/ and testing/ kept, not re-split by "patient"
        assert all(s == ("train" if c.startswith("training/") else "test") for c, s in split_of.items())
        assert aligned["masks_shape"][1] == 4
    elif root is None and _env(command) == "folders":  # HPU-Net train/ val/ test/
        assert all(c.split("/")[0] == s for c, s in split_of.items()), split_of
    elif root == "data/01_raw/bubil":  # one rater skipped one image: invalid there, others kept
        assert aligned["masks_shape"][1] == 4 and aligned["rater_valid_per_rater"] == [3, 2, 3, 3]
    elif root == "data/01_raw/bone_us":  # patients are the groups: 3 patients, 6 scans
        assert aligned["groups"] == 3 and aligned["images_shape"][0] == 6
    if "alignment.split.train" in command:
        fractions = {k.rsplit(".", 1)[1]: float(v) for k, v in _params(command).items() if "split" in k}
        present = {s for s, f in fractions.items() if f > 0}
        assert set(aligned["splits"]) == present, aligned["splits"]


def test_a_leading_star_needs_quotes_inside_the_params_string():
    """Why the documented globs are quoted twice: Kedro reads each --params value as YAML."""
    with pytest.raises(yaml.YAMLError, match="alias"):
        parsed_by_kedro('kedro run --params "ingestion.reader.case_glob=*/*"')
    quoted = parsed_by_kedro("""kedro run --params "ingestion.reader.case_glob='*/*'" """)
    assert quoted["params"] == {"ingestion": {"reader": {"case_glob": "*/*"}}}
