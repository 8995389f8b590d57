"""Issue 19 (6 and "done when"): every code block of the README runs as written, from a fresh
clone, on a tiny model: the walk-through from an HH-RLHF export and a local model folder to a
promoted model on a CPU, the library snippets (DPO from Python and the shell, ``dpo.yaml``,
``build-dataset``, the reward model, scoring) and the serving snippet.

How: the blocks run in README order in one working folder that holds what a clone has
(``configs/``, ``infra/``, and the ``.venv`` that ``make`` creates, linked), the user's export (``hh-rlhf.jsonl``, written here in the public
HH-RLHF layout with a few bad rows) and nothing else. ``bash`` blocks run with bash, ``python``
blocks with the project's Python, a ``yaml`` block whose first line names a file
(``# dpo.yaml``) is saved under that name. The only changes to the text: the model a user
names (``Qwen/Qwen2.5-0.5B-Instruct``, ``/path/to/your/model``) becomes a tiny local Llama
folder (rotary positions set to 2048, so the example config's ``max_length`` fits). Training
processes use the session's Prefect test server (``PREFECT_API_URL``), not one of their own.

Skipped commands, each with its reason in :data:`SKIPPED`: ``make run`` / ``make test``
themselves (the demo round and the whole suite, which runs this test) and commands that start
servers or need them (UIs, ``mlflow models serve`` and the ``curl`` to it, Docker Compose and the
deployment run on it; the production set-up is exercised by tests/integration/test_real_servers.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import BAD, GOOD, NEUTRAL, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SKIPPED = {
    "make": ('[ "${1:-}" = run ] || [ "${1:-}" = test ]',
             "make run / make test themselves: the demo round and the whole suite (which runs this test)"),
    "mlflow": ('[ "${1:-}" = ui ] || [ "${1:-} ${2:-}" = "models serve" ]', "starts the MLflow UI or a model server"),
    "prefect": ('[ "${1:-} ${2:-}" = "server start" ] || [ "${1:-} ${2:-}" = "deployment run" ]',
                "starts the Prefect UI server / runs a deployment of the Docker Compose servers"),
    "docker": ('[ "${1:-}" = compose ]', "starts the production servers (tests/integration/test_real_servers.py starts them)"),
    "curl": ('case "$*" in *127.0.0.1:5001*) true;; *) false;; esac', "talks to the model server not started above"),
}
"""Commands the blocks do not run, each with the test that tells it (a shell condition on its
arguments) and why. They are shell functions in front of each bash block, so a skipped command
written over several lines (a quoted JSON body) is skipped whole; each skip is logged."""
USER_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "/path/to/your/model")
TIMEOUT_S = 900


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block, in order (blocks indented in a list
    item are dedented)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if match:
            indent, start, body = len(match.group(1)), i + 1, []
            i += 1
            while not lines[i].strip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            blocks.append((match.group(2), "\n".join(body) + "\n", start))
        i += 1
    return blocks


def bash_prelude(skip_log: Path) -> str:
    """Shell functions that skip the :data:`SKIPPED` commands (logging them) and run the rest."""
    out = []
    for name, (test, reason) in SKIPPED.items():
        out.append(f"{name}() {{ if {test}; then echo \"{name} $*  ({reason})\" >> {skip_log}; "
                   f"else command {name} \"$@\"; fi; }}")
    return "\n".join(out) + "\n"


def block_command(lang: str, body: str, skip_log: Path) -> list[str] | None:
    """The command that runs a ``bash`` block (after :func:`bash_prelude`) or a ``python`` block
    with this Python; None for any other block."""
    if lang == "bash":
        return ["bash", "-euo", "pipefail", "-c", bash_prelude(skip_log) + body]
    if lang == "python":
        return [sys.executable, "-c", body]
    return None


def hh_export(path: Path, rows: int = 150, seed: int = 0) -> None:
    """A public HH-RLHF layout file: full conversations in chosen/rejected, ~1.5% bad rows."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        prompt = f"review the {rng.choice(NEUTRAL)} {rng.choice(NEUTRAL)} {i}"
        good = " ".join(rng.sample(GOOD, 3))
        bad = " ".join(rng.sample(BAD, 3))
        lines.append({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: the film was {good}",
                      "rejected": f"\n\nHuman: {prompt}\n\nAssistant: the film was {bad}"})
    lines[7]["rejected"] = None       # what real exports contain
    lines[42] = {"chosen": "\n\nHuman: hello"}
    path.write_text("\n".join(json.dumps(row) for row in lines) + "\n")


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder with what a fresh clone has that the README uses, the user's export and model."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "clone"
    work.mkdir()
    for name in ("configs", "infra"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns(".env"))
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)  # what `make` creates in a clone
    model = make_tiny_model(root / "my-model", "llama")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    hh_export(work / "hh-rlhf.jsonl")
    return work, model


def _env(prefect_api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ALIGNFLOW_HOME", "PREFECT_API_URL")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PREFECT_API_URL=prefect_api_url,
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_every_readme_code_block_runs_as_written(clone, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    work, model = clone
    env = _env(PREFECT_API_URL.value())
    text = (REPO / "README.md").read_text()
    for name in USER_MODELS:
        text = text.replace(name, str(model))
    ran, logs, skip_log = [], [], work.parent / "skipped.log"
    for lang, body, line in code_blocks(text):
        if lang == "yaml" and (named := re.match(r"#\s*([\w.-]+\.ya?ml)\s*$", body.splitlines()[0])):
            (work / named.group(1)).write_text(body)
            ran.append(f"README.md:{line} saved {named.group(1)}")
            continue
        if (cmd := block_command(lang, body, skip_log)) is None:
            continue  # a diagram or a config excerpt: nothing to run
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        logs.append(f"--- README.md:{line} ({time.monotonic() - started:.0f} s)\n{proc.stdout}\n{proc.stderr}")
        assert proc.returncode == 0, (f"README.md:{line} ({lang}) exited {proc.returncode}:\n{body}\n"
                                      f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}")
        ran.append(f"README.md:{line} {lang}")
    output = "\n".join(logs)
    (work.parent / "readme-blocks.log").write_text(output)  # what each block printed, and its seconds
    skipped = skip_log.read_text().splitlines()
    assert [s.split("  (")[0] for s in skipped if s.startswith("make")] == ["make run", "make test"]
    assert len(ran) >= 10, ran
    # the walk-through: a promoted model from a public export and a local folder, on a CPU
    assert ("reward.compile, reward.varlen_attention, dpo.compile, dpo.varlen_attention: GPU fast paths, "
            "switched off on this machine") in output
    assert "Traceback" not in output, output[-8000:]
    assert "do not exist - skipping acquisition" not in output  # no concurrency-limit warning (gpu, registry)
    assert (work / "tables" / "pairs-train.parquet").exists()
    for run in ("runs/dpo", "runs/dpo-cli", "runs/dpo-beta0.2", "runs/dpo-4gpu", "runs/reward"):
        assert (work / run / "final").is_dir(), run
    status = subprocess.run([str(Path(sys.executable).parent / "alignflow"), "status"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "pipeline assistant of" in status.stderr and "champion" in status.stdout
    assert re.search(r"champion\s*│\s*1\s", status.stdout), status.stdout
