"""Run one training recipe in its own process and stream its metrics into MLflow.

Why a process: GPU memory is freed when it exits, several GPUs need ``accelerate launch``,
and a timeout must really stop the work (the whole process group is killed). The recipe
writes ``metrics.jsonl`` line by line; :class:`tasks.tracking.MetricStreamer` tails it into
the stage's MLflow run while a progress bar follows the steps.

Resume: the run folder is chosen by the caller from the stage's cache key, so a re-run after
a crash finds the recipe's checkpoints there and the recipe resumes from the newest one. A
folder whose run already finished with the same config (:func:`finished_summary`) is not
launched again: its metrics are logged to the new MLflow run and its summary returned, which
does not need the checkpoints (the pipeline deletes them once a run finishes).
"""

from __future__ import annotations

import json
import logging
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
from tasks.faults import armed, fault_point
from tasks.progress import TrainingProgress
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


def _stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task (the UI shows it), else this module's."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no Prefect run context (library use, tests)
        return logging.getLogger(__name__)


class StallWatch:
    """Says when a training process makes no progress: a warning each time ``after_s`` passes
    with no new line in its ``metrics.jsonl`` (a step or an evaluation), naming the stage and
    the seconds since the last step (or since the start, before the first one).

    Why: a process can sit for many minutes before its first step (loading a large model,
    precomputing reference log-probs, compiling) or stop advancing; without a message a
    user cannot tell either from a hang. It only warns: ``stage_timeout_s`` stops work.
    """

    def __init__(self, metrics_path: Path, stage: str, after_s: float | None, log_path: Path | None = None,
                 clock=time.monotonic):
        self.path, self.stage, self.after_s, self.log_path, self.clock = metrics_path, stage, after_s, log_path, clock
        self.started = self.last_progress = self.last_warning = clock()
        self.size = self._size()
        self.steps_seen = self.size > 0  # a resumed run's file already holds steps
        self.warnings: list[str] = []

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def check(self) -> str | None:
        """Call periodically; returns (and logs) the warning when one is due, else None."""
        if not self.after_s:
            return None
        now, size = self.clock(), self._size()
        if size != self.size:
            self.size, self.last_progress, self.last_warning = size, now, now
            self.steps_seen = True
            return None
        if now - self.last_warning < self.after_s:
            return None
        self.last_warning = now
        quiet = now - self.last_progress
        since = "since its last step" if self.steps_seen else "since it started, none yet"
        message = (f"stage {self.stage}: no training step for {quiet:.0f} s ({since}); it is still running"
                   + (f", log: {self.log_path}" if self.log_path else "")
                   + " (warning after pipeline.stall_warning_s)")
        self.warnings.append(message)
        _stage_logger().warning(message)
        return message


def build_command(recipe: str, config_path: Path, processes: int = 1,
                  accelerate_config: str | None = None, log_dir: Path | None = None) -> list[str]:
    """The argv that runs ``alignment.train`` directly, or under ``accelerate launch``. ``log_dir``:
    where torch's elastic agent keeps its per-launch folders (without one it makes a new
    ``/tmp/torchelastic_*`` folder on every launch and leaves it there)."""
    train = ["-m", "alignment.train", recipe, "--config", str(config_path)]
    if processes <= 1 and not accelerate_config:
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if log_dir is not None:
        launch += ["--log_dir", str(log_dir)]
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
    if (processes > 1 or accelerate_config) and cuda_count() == 0:
        return {"ACCELERATE_USE_CPU": "true"}
    return {}


def device_env(device: str) -> dict[str, str]:
    """Extra environment of a training process for ``pipeline.device``: ``cpu`` hides every CUDA
    device from it, so torch and accelerate train on the CPU even on a GPU host (several processes
    join a gloo group, as on a GPU-less host: :func:`launch_env`); ``auto`` and ``cuda`` leave the
    environment as it is (``cuda`` without a device is refused by preflight)."""
    return {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"} if device == "cpu" else {}


def resolve_device(device: str) -> str:
    """Where ``pipeline.device`` runs on this host: ``cuda`` unless it says ``cpu`` or no CUDA
    device is visible."""
    return "cuda" if device != "cpu" and cuda_count() > 0 else "cpu"


def cuda_count() -> int:
    """CUDA devices visible to this process (0 without CUDA support in torch)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - torch without CUDA support
        return 0


def die_with_parent() -> None:
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


def finished_summary(run_dir: Path, recipe: str | None = None, config_text: str | None = None) -> dict[str, Any] | None:
    """The ``summary.json`` of a run in ``run_dir`` that finished (the summary says so and
    ``final/`` holds a model config; the recipe writes the summary after ``final/``), else None.
    With ``recipe`` and ``config_text``, only a run whose saved ``<recipe>.yaml`` has exactly that
    text (a run of other settings in the same folder is not this one). An unreadable summary
    counts as unfinished: the recipe then resumes from its checkpoints, which it deletes only
    after writing the summary."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("finished") is not True:
        return None
    if not (run_dir / "final" / "config.json").is_file():
        return None
    if recipe is not None and config_text is not None:
        saved = run_dir / f"{recipe}.yaml"
        if not saved.is_file() or saved.read_text() != config_text:
            return None
    return summary


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
    stall_warning_s: float | None = None,
    progress_every_s: float | None = 60.0,
) -> dict[str, Any]:
    """Run ``recipe`` with ``settings`` in a child process; return its ``summary.json``.

    ``settings.output_dir`` is set to ``run_dir``. Raises :class:`TrainingFailed` (non-zero
    exit, with the log's tail) or :class:`TrainingTimeout`. Interrupting the caller kills the
    child process group. With ``stall_warning_s``, a warning naming the stage and the seconds
    since the last step is logged each time that long passes without a new line in
    ``metrics.jsonl`` (:class:`StallWatch`); the process keeps running. Progress (step, loss,
    key metrics, ETA) is logged to the Prefect run at most every ``progress_every_s`` seconds,
    evaluations at once, and followed by a progress artifact (:class:`tasks.progress.TrainingProgress`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"output_dir": str(run_dir)})
    config_path = run_dir / f"{recipe}.yaml"
    config_text = yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
    done = finished_summary(run_dir, recipe, config_text)
    if done is not None:  # finished before (a crash after training, before the stage recorded it)
        _stage_logger().info("%s: finished earlier in %s; not launched again", description or recipe, run_dir)
        MetricStreamer(run_dir / "metrics.jsonl", mlflow_run_id).stop()  # its curves on this stage's run
        return done
    config_path.write_text(config_text)
    log_path = run_dir / "train.log"
    cmd = build_command(recipe, config_path, processes, accelerate_config, log_dir=run_dir / "launch")
    env = {**TRAINING_ENV_DEFAULTS, **os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           **launch_env(processes, accelerate_config), **(extra_env or {})}

    bar = tqdm(desc=description or recipe, unit="step", dynamic_ncols=True, leave=True)
    progress = TrainingProgress(description or recipe, progress_every_s)

    def on_line(rec: dict[str, Any]) -> None:
        progress.observe(rec)
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
                                preexec_fn=die_with_parent)
        if streamer:
            streamer.start()
        watch = StallWatch(run_dir / "metrics.jsonl", description or recipe, stall_warning_s, log_path)
        try:
            while proc.poll() is None:
                watch.check()
                progress.tick()
                if armed(f"train:{recipe}") and (run_dir / "metrics.jsonl").exists() and \
                        (run_dir / "metrics.jsonl").stat().st_size:  # crash tests: die mid-training
                    fault_point(f"train:{recipe}")
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
    progress.finish()
    if proc.returncode != 0:
        raise TrainingFailed(f"{recipe} training failed (exit {proc.returncode}); end of {log_path}:\n"
                             f"{_tail(log_path)}")
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise TrainingFailed(f"{recipe} training exited 0 but wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    summary.setdefault("wall_s", time.monotonic() - start)
    return summary
