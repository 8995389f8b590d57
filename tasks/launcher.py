"""Run one training recipe in its own process and stream its metrics into MLflow.

Why a process: GPU memory is freed when it exits, several GPUs need ``accelerate launch``,
and a timeout must really stop the work (the whole process group is killed). The recipe
writes ``metrics.jsonl`` line by line; :class:`tasks.tracking.MetricStreamer` tails it into
the stage's MLflow run while a progress bar follows the steps.

Resume: the run folder is chosen by the caller from the stage's cache key, so a re-run after
a crash finds the recipe's checkpoints there and the recipe resumes from the newest one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from alignment.config import TrainSettings
from tasks.tracking import MetricStreamer

TRAINING_ENV_DEFAULTS = {
    # Passive OpenMP waits and glibc keeping freed memory mapped: on a busy CPU, spinning
    # threads and per-step unmap/remap of activations cost 3-10x and ~40% respectively.
    # The environment wins over these defaults.
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
}


class TrainingFailed(RuntimeError):
    """The training process exited non-zero; the message holds the end of its log."""


class TrainingTimeout(TimeoutError):
    """The training process ran past its wall-clock limit and was killed."""


def build_command(recipe: str, config_path: Path, processes: int = 1,
                  accelerate_config: str | None = None) -> list[str]:
    """The argv that runs ``alignment.train`` directly, or under ``accelerate launch``."""
    train = ["-m", "alignment.train", recipe, "--config", str(config_path)]
    if processes <= 1 and not accelerate_config:
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if accelerate_config:
        launch += ["--config_file", accelerate_config]
    elif processes > 1:
        # Also on CPU: `--cpu` starts ONE process (accelerate's CPU launcher needs MPI). The torchrun
        # launcher plus ACCELERATE_USE_CPU (launch_env) starts `processes` gloo processes instead.
        launch += ["--multi_gpu"]
    return [*launch, *train]


def launch_env(processes: int = 1, accelerate_config: str | None = None) -> dict[str, str]:
    """Extra environment of the launch: without CUDA, ``ACCELERATE_USE_CPU`` makes each
    process join a gloo group (MULTI_CPU); otherwise each would train alone on its shard."""
    if (processes > 1 or accelerate_config) and _cuda_count() == 0:
        return {"ACCELERATE_USE_CPU": "true"}
    return {}


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - torch without CUDA support
        return 0


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the launching thread dies, so a
    crashed or killed flow process never leaves training running (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_recipe(
    recipe: str,
    settings: TrainSettings,
    run_dir: Path,
    *,
    mlflow_run_id: str | None = None,
    processes: int = 1,
    accelerate_config: str | None = None,
    timeout_s: float = 6 * 3600,
    description: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` with ``settings`` in a child process; return its ``summary.json``.

    ``settings.output_dir`` is set to ``run_dir``. Raises :class:`TrainingFailed` (non-zero
    exit, with the log's tail) or :class:`TrainingTimeout`. Interrupting the caller kills the
    child process group.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"output_dir": str(run_dir)})
    config_path = run_dir / f"{recipe}.yaml"
    config_path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    log_path = run_dir / "train.log"
    cmd = build_command(recipe, config_path, processes, accelerate_config)
    env = {**TRAINING_ENV_DEFAULTS, **os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           **launch_env(processes, accelerate_config), **(extra_env or {})}

    bar = tqdm(desc=description or recipe, unit="step", dynamic_ncols=True, leave=True)

    def on_line(rec: dict[str, Any]) -> None:
        if rec.get("phase", "train") != "train":
            return
        total = rec.get("total_steps")
        if total and bar.total != total:
            bar.total = int(total)
        bar.n = int(rec.get("step", bar.n))
        shown = {k: rec[k] for k in ("loss", "rewards/accuracy", "accuracy", "reward/raw", "kl") if k in rec}
        bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=True)

    streamer = MetricStreamer(run_dir / "metrics.jsonl", mlflow_run_id, interval_s=1.0, on_line=on_line)
    start = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        if streamer:
            streamer.start()
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout_s:
                    _kill_group(proc)
                    raise TrainingTimeout(f"{recipe} training ran past {timeout_s:.0f} s and was stopped; "
                                          f"log: {log_path}")
                time.sleep(0.5)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if streamer:
                streamer.stop()
            bar.close()
    if proc.returncode != 0:
        raise TrainingFailed(f"{recipe} training failed (exit {proc.returncode}); end of {log_path}:\n"
                             f"{_tail(log_path)}")
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise TrainingFailed(f"{recipe} training exited 0 but wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    summary.setdefault("wall_s", time.monotonic() - start)
    return summary
