"""Multi-process training on CPU: the pipeline's launcher (:func:`tasks.launcher.run_recipe`)
with ``processes=2`` runs ``accelerate launch --num_processes 2`` (gloo) of the DPO recipe, and
that follows the same loss curve as one process at the same global batch.

Why it holds: the length-grouped sampler deals each global batch of ``batch_size x processes``
examples out by stride, so both runs see the same examples at every step; DDP averages
gradients over processes and each process's loss is a mean over an equal share, so the update
is the one-process update up to float summation order. The tolerance covers that order (seen:
below 1e-5), nothing more. Two processes that do not form a group (each training alone on
half the batch, which is what ``accelerate launch --cpu --num_processes 2`` silently does) are
already 7e-2 apart in loss at step 2; dropout is off because its masks follow each process's
own RNG stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import DPOConfig, ModelSettings, OptimSettings
from tasks.launcher import build_command, launch_env, run_recipe
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

GLOBAL_BATCH = 8
STEPS = 8
CURVE_KEYS = ("loss", "grad_norm", "rewards/margin", "logps/chosen", "logps/rejected")
# one thread per process: two processes on two cores, and the same kernels in both runs
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    model = make_tiny_model(root / "gpt2", "gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    pairs = root / "pairs.parquet"
    preference_pairs(48, seed=5).to_parquet(pairs)
    return root, model, pairs


def _settings(model: Path, pairs: Path, processes: int) -> DPOConfig:
    return DPOConfig(
        model=ModelSettings(name_or_path=str(model)), train_path=str(pairs),
        batch_size=GLOBAL_BATCH // processes, grad_accum=1, max_steps=STEPS, seed=3, beta=0.5,
        max_length=64, max_prompt_length=32, optim=OptimSettings(lr=3e-3, schedule="constant"),
    )


def _curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("phase") == "train"]


def test_launch_command_starts_a_process_group_on_cpu():
    cmd = build_command("dpo", Path("run.yaml"), processes=2, log_dir=Path("run/launch"))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--log_dir") + 1] == "run/launch"
    import torch

    if torch.cuda.device_count() == 0:
        assert launch_env(2) == {"ACCELERATE_USE_CPU": "true"}
    assert launch_env(1) == {}


def test_two_cpu_processes_follow_the_one_process_loss_curve(inputs):
    root, model, pairs = inputs
    curves, summaries = {}, {}
    for processes in (1, 2):
        run_dir = root / f"p{processes}"
        summaries[processes] = run_recipe("dpo", _settings(model, pairs, processes), run_dir,
                                          processes=processes, timeout_s=240, extra_env=THREADS)
        curves[processes] = _curve(run_dir)
        assert [r["step"] for r in curves[processes]] == list(range(1, STEPS + 1))
        assert (run_dir / "final" / "model.safetensors").exists()
    log = (root / "p2" / "train.log").read_text()
    assert "accelerate.commands.launch" in log and "--num_processes 2" in log
    # the elastic agent's folder of the launch is kept with the run, not left in /tmp
    assert [p.name for p in (root / "p2" / "launch").iterdir()] and not (root / "p1" / "launch").exists()
    for key in CURVE_KEYS:
        one = [r[key] for r in curves[1]]
        two = [r[key] for r in curves[2]]
        for step, (x, y) in enumerate(zip(one, two, strict=True), start=1):
            assert abs(x - y) <= 1e-5 + 1e-4 * abs(x), f"{key} at step {step}: one process {x}, two {y}\n{one}\n{two}"
    losses = [r["loss"] for r in curves[1]]
    assert losses[-1] < losses[0] - 0.2, f"the run must really train: {losses}"
    assert summaries[1]["steps"] == summaries[2]["steps"] == STEPS
