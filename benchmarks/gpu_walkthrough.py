"""Issue 19 on a GPU: the README's walk-through run as written with ``configs/examples/qwen-lora-dpo.yaml``.

    python3 benchmarks/gpu_walkthrough.py --out $OUT                                     # the device
    .venv/bin/python benchmarks/gpu_walkthrough.py --shape tiny --rows 60 --out /tmp/G/wt  # CPU dry run

The README section "Walk-through: a public export and a local model to a promoted model" (found by
its heading) is cut out of README.md and its fenced blocks run in order, as CI runs them on a CPU
(tests/integration/test_readme.py: the same block parser, the same HH-RLHF export writer, the same
replacement of the model a user names by a local folder): ``bash`` blocks with ``bash -euo
pipefail``, ``python`` blocks with this Python, in a folder that holds what a clone has
(``configs/``), the export ``hh-rlhf.jsonl`` and ``.venv/bin/activate``, which puts an
``alignflow`` launcher for this Python on PATH (on the device the package is not installed, its
dependencies travel as wheels on PYTHONPATH). Nothing of the config is changed: ``compile``,
``packing``, ``varlen_attention``, bf16 and LoRA as written.

The model is a local Hugging Face folder of ``--shape`` (benchmarks.gpu_bench.build_shape: the
Qwen2.5-0.5B shape, random weights) with a byte-level tokenizer (benchmarks.gpu_pipeline.byte_tokenizer)
and a ChatML chat template like Qwen's saved into it: no hub on the device.

Figures: each block's seconds, exit code and GPU busy share (NVML), every training's summary.json
(steps, wall time, tokens/s), the pipeline's own stage table and the gate's verdict as printed.
Results: ``--out``/walkthrough.json, walkthrough.log (each block's output) and a table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "### Walk-through: a public export and a local model to a promoted model"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2.5's chat layout (ChatML), for the byte-level tokenizer: HH-RLHF prompts become chats."""


def walkthrough_blocks(readme: str) -> list[tuple[str, str, int]]:
    """(language, body, README line) of the fenced blocks of the walk-through section, in order."""
    from tests.integration.test_readme import code_blocks

    start = next(i for i, line in enumerate(readme.splitlines()) if line.startswith(SECTION))
    lines = readme.splitlines()
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{2,3} ", lines[i])), len(lines))
    return [(lang, body, line + start) for lang, body, line in code_blocks("\n".join(lines[start:end]))]


def make_clone(work: Path, python: str) -> Path:
    """A folder with what a clone has that the walk-through uses (``configs/``) and a ``.venv`` whose
    ``activate`` puts ``alignflow`` (this Python, this checkout on PYTHONPATH) on PATH."""
    clone = work / "clone"
    shutil.copytree(ROOT / "configs", clone / "configs")
    bin_dir = clone / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    launcher = bin_dir / "alignflow"
    launcher.write_text(f'#!/bin/sh\nexec "{python}" -m flows.cli "$@"\n')
    launcher.chmod(0o755)
    return clone


def make_model(work: Path, shape: str, device) -> Path:
    """A local HF folder of ``shape`` with random weights and a byte-level ChatML tokenizer."""
    from benchmarks.gpu_bench import SHAPES, build_shape
    from benchmarks.gpu_pipeline import byte_tokenizer

    folder = build_shape(work, shape, device)
    tokenizer = byte_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


def run_blocks(blocks, clone: Path, model: Path, env: dict, log, sampler, timeout_s: float) -> list[dict]:
    """Run each block in ``clone`` (the user's model names replaced by ``model``); stop at the first failure."""
    from tests.integration.test_readme import USER_MODELS, block_command

    done = []
    for lang, body, line in blocks:
        for name in USER_MODELS:
            body = body.replace(name, str(model))
        if (cmd := block_command(lang, body, clone.parent / "skipped.log")) is None:
            continue
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout_s)
        t1 = time.monotonic()
        log.write(f"--- README.md:{line} {lang} ({t1 - t0:.1f} s, exit {proc.returncode})\n{body}\n"
                  f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
        log.flush()
        busy = sampler.busy(t0, t1)
        done.append({"line": line, "lang": lang, "body": body, "seconds": round(t1 - t0, 1),
                     "rc": proc.returncode, "gpu_busy": busy, "stdout_tail": proc.stdout[-4000:],
                     "stderr_tail": proc.stderr[-3000:]})
        print(f"# README.md:{line} {lang}: {t1 - t0:.1f} s, exit {proc.returncode}", flush=True)
        if proc.returncode != 0:
            break
    return done


def trainings(home: Path) -> list[dict]:
    """Each training run's summary.json under the home (stage folder, steps, wall time, tokens/s)."""
    out = []
    for path in sorted(home.glob("runs/**/summary.json")):
        data = json.loads(path.read_text())
        out.append({"run": str(path.parent.relative_to(home)),
                    **{k: data.get(k) for k in ("recipe", "steps", "wall_time_s", "train_time_s", "tokens_seen",
                                                "tokens_per_s", "data")},
                    "metrics": {k: v for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))}})
    return out


STAGE_ROW = re.compile(r"^[│|]\s*([a-z][a-z +()-]*?)\s*[│|]\s*(\w[\w-]*)\s*[│|]\s*([\d.]+)\s*[│|](.*)$")


def pipeline_summary(stdout: str) -> dict:
    """The run's own summary as printed: stage rows (name, status, seconds), the wall/stage/orchestration
    line, the registry line and the gate's reasons."""
    stages = [{"stage": m[1], "status": m[2], "seconds": float(m[3])}
              for m in map(STAGE_ROW.match, stdout.splitlines()) if m]
    keep = ("wall ", "evaluation:", "registry:", "  - ")
    return {"stages": stages, "lines": [line for line in stdout.splitlines() if line.startswith(keep)]}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "prefect", "mlflow-skinny", "mlflow", "pandera",
                 "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen0.5b")
    parser.add_argument("--rows", type=int, default=600, help="rows of the HH-RLHF export")
    parser.add_argument("--work", default="/tmp/alignflow-walkthrough", help="made fresh")
    parser.add_argument("--block-timeout-s", type=float, default=1800)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_walkthrough_out"))
    args = parser.parse_args()
    import torch

    from benchmarks.gpu_pipeline import GpuSampler
    from tests.integration.test_readme import hh_export

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.monotonic()
    clone = make_clone(work, sys.executable)
    model = make_model(work, args.shape, device)
    hh_export(clone / "hh-rlhf.jsonl", rows=args.rows)
    prepared_s = time.monotonic() - t0
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ALIGNFLOW_HOME", "PREFECT_API_URL")}
    pythonpath = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    # The README's later blocks run in the shell its first block activated: the venv's bin on PATH, as in CI.
    env.update(PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(pythonpath), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="160")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")  # first import of the server stack
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    with (out / "walkthrough.log").open("w") as log, GpuSampler() as gpu:
        started = time.monotonic()
        done = run_blocks(blocks, clone, model, env, log, gpu, args.block_timeout_s)
        wall = time.monotonic() - started
        busy = gpu.busy(started, time.monotonic())
    record = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "versions": versions(),
              "shape": args.shape, "rows": args.rows, "prepared_s": round(prepared_s, 1), "blocks": done,
              "all_ran": len(done) == sum(lang in ("bash", "python") for lang, _, _ in blocks)
              and all(b["rc"] == 0 for b in done),
              "wall_s": round(wall, 1), "gpu_busy": busy, "trainings": trainings(clone / ".alignflow"),
              "pipeline": pipeline_summary(next((b["stdout_tail"] for b in done if "alignflow run" in b.get("body", "")),
                                                done[0]["stdout_tail"] if done else "")),
              "skipped": (work / "skipped.log").read_text().splitlines() if (work / "skipped.log").exists() else []}
    (out / "walkthrough.json").write_text(json.dumps(record, indent=1, default=str))
    rows = ["| README block | seconds | exit | GPU busy |", "|---|---|---|---|"]
    for b in done:
        pct = "" if b["gpu_busy"] is None else f"{100 * b['gpu_busy']:.0f}%"
        first = " / ".join(c.split("#")[0].strip()[:60] for c in b["body"].splitlines() if c.split("#")[0].strip())
        rows.append(f"| :{b['line']} `{first[:200]}` | {b['seconds']:.1f} | {b['rc']} | {pct} |")
    print("\n".join(rows))
    for stage in record["pipeline"]["stages"]:
        print(f"# stage {stage['stage']}: {stage['status']} {stage['seconds']} s")
    print("\n".join(record["pipeline"]["lines"]))
    for t in record["trainings"]:
        print("# training", json.dumps(t, default=str))
    print(f"# device {record['device']}; all blocks ran: {record['all_ran']}; wall {wall:.1f} s; "
          f"model + export {prepared_s:.1f} s; versions {json.dumps(record['versions'])}")


if __name__ == "__main__":
    main()
