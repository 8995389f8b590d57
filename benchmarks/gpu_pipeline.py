"""``alignflow run`` end to end on a GPU, every stage timed, with the GPU's busy share (issue 16 point 5).

    python3 benchmarks/gpu_pipeline.py --out $OUT                      # the device (Prefect, MLflow as wheels)
    .venv/bin/python benchmarks/gpu_pipeline.py --shape tiny --pairs 120 --out /tmp/gp   # CPU dry run

It builds a model of ``--shape`` with random weights (benchmarks.gpu_bench.build_shape: the
Qwen2.5-0.5B shape and a word-level tokenizer of its vocabulary) and ``--pairs`` preference pairs
with HH-RLHF token counts (the law of benchmarks.gpu_trl_best) whose simulated annotators prefer
responses with more of a few "liked" letters, as one JSONL file in the landing folder; the
tokenizer is byte-level with no merges (:func:`byte_tokenizer`), saved into the model folder.
Then one round of configs/examples/gpu-pipeline.yaml (ingest -> reward model -> LoRA DPO ->
evaluation -> register) through the same flow ``alignflow run --config`` calls.

Figures: each stage's seconds (the pipeline's own summary rows), the flow's wall time, and the
orchestration overhead = flow wall - sum of stage seconds (Prefect task and flow bookkeeping,
MLflow logging between stages, the summary). Prefect's temporary server is started first by a
no-op flow, and the home's MLflow store is created, both timed apart: a deployment's rounds run
against a server that is up and a store that exists. GPU busy
share = mean of NVML's utilisation (the share of each sampling period in which a kernel ran),
sampled every 0.1 s, over the flow and over each stage. Results: ``--out``/pipeline.json and a
markdown table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

class GpuSampler:
    """NVML utilisation of GPU 0 every ``period`` s in a thread: (monotonic time, percent) samples."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no GPU or no NVML: no samples
            self._handle = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.monotonic(), util.gpu))
            time.sleep(self.period)

    def __enter__(self):
        if self._handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def busy(self, start: float, end: float) -> float | None:
        """Mean utilisation (0-1) of the samples between ``start`` and ``end`` (None without samples)."""
        window = [u for t, u in self.samples if start <= t <= end]
        return sum(window) / len(window) / 100 if window else None


LETTERS = "abcdefghijklmnopqrstuvwxyz"
LIKED = "abcde"
"""Simulated annotators prefer the response with more of these letters (chosen draws half from them)."""


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with no merges (one token per byte), specials <pad> <unk> <bos> <eos>,
    padded to ``vocab_size`` with unused entries. Saved into a Qwen2/Llama model folder it reloads
    through that model's own tokenizer class with the same ids (a word-level vocabulary does not:
    Qwen2's class would pre-tokenize it away)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    vocab.update({f"<unused_{i}>": len(vocab) + i for i in range(vocab_size - len(vocab))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def text(rng: random.Random, n: int, letters: str = LETTERS, liked_share: float = 0.0) -> str:
    """About ``n`` tokens of random words (one token per character and per space)."""
    chars = []
    while len(chars) < n:
        if chars:
            chars.append(" ")
        chars += [rng.choice(LIKED) if rng.random() < liked_share else rng.choice(letters)
                  for _ in range(rng.randint(2, 8))]
    return "".join(chars[:n]).strip() or "a"


def feedback(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected rows with HH-RLHF token counts; the chosen response draws half its
    letters from :data:`LIKED`."""
    from benchmarks.gpu_trl_best import DISTS, lognormal

    rng = random.Random(seed)
    law = DISTS["hh"]
    rows = []
    for _ in range(n):
        p = min(lognormal(rng, law["prompt_mean"], law["sigma"]), seq // 2)
        c, r = (min(lognormal(rng, law["response_mean"], law["sigma"]), seq - p - 1) for _ in range(2))
        rows.append({"prompt": text(rng, p), "chosen": text(rng, c, liked_share=0.5), "rejected": text(rng, r)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen0.5b")
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--work", default="/tmp/alignflow-gpu", help="model, landing folder and home (made fresh)")
    parser.add_argument("--config", default=str(ROOT / "configs/examples/gpu-pipeline.yaml"))
    parser.add_argument("--set", action="append", default=[], help="extra key.path=value overrides")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_pipeline_out"))
    args = parser.parse_args()
    started = time.monotonic()
    import shutil

    import torch

    from benchmarks.gpu_bench import SHAPES, build_shape

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "landing").mkdir(parents=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SHAPES[args.shape]
    folder = build_shape(work, args.shape, device)
    tokenizer = byte_tokenizer(spec["vocab_size"])
    tokenizer.save_pretrained(folder)  # a complete model folder, as users have
    from transformers import AutoTokenizer

    probe = "abc de fgh"
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"] or reloaded.eos_token_id != tokenizer.eos_token_id:
        raise SystemExit(f"the tokenizer does not reload as saved through {type(reloaded).__name__}: "
                         f"{reloaded(probe)['input_ids']} vs {tokenizer(probe)['input_ids']}")
    rows = feedback(args.pairs, min(spec["seq"], 1024))
    with (work / "landing" / "feedback-0001.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.environ["ALIGNFLOW_HOME"] = str(work / "home")
    overrides = [f"model.policy.name_or_path={folder}", f"model.reward.name_or_path={folder}",
                 f"data.landing_dir={work / 'landing'}", *args.set]
    prepared_s = time.monotonic() - started

    from prefect import flow

    import flows.pipeline as pipeline

    windows: list[tuple[str, str, float, float]] = []
    timed = pipeline.PipelineRound.timed

    def timed_with_window(self, stage, status, t0, metrics=None):
        windows.append((stage, status, t0, time.monotonic()))
        return timed(self, stage, status, t0, metrics)

    pipeline.PipelineRound.timed = timed_with_window

    @flow(name="warm-up")
    def warm_up() -> int:
        return 0

    t0 = time.monotonic()
    warm_up()
    server_s = time.monotonic() - t0
    from tasks import tracking

    cfg = pipeline.resolve_config(args.config, overrides)
    t0 = time.monotonic()
    tracking.configure(cfg.home, cfg.pipeline.name)  # the MLflow store's schema, made once per home
    store_s = time.monotonic() - t0
    with GpuSampler() as gpu:
        t0 = time.monotonic()
        result = pipeline.alignment_pipeline(config=args.config, overrides=overrides)
        t1 = time.monotonic()
    flow_s = t1 - t0
    stages = [{"stage": s, "status": st, "seconds": round(b - a, 2), "gpu_busy": gpu.busy(a, b)}
              for s, st, a, b in windows]
    stage_s = sum(r["seconds"] for r in stages)
    record = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "shape": args.shape, "pairs": args.pairs, "prepared_s": prepared_s, "prefect_server_start_s": server_s,
        "mlflow_store_create_s": store_s,
        "flow_wall_s": flow_s, "stage_sum_s": stage_s, "overhead_s": flow_s - stage_s,
        "overhead_share": (flow_s - stage_s) / flow_s, "gpu_busy_flow": gpu.busy(t0, t1), "stages": stages,
        "gpu_samples": len(gpu.samples), "status": result.get("status"),
        "summary_wall_s": result.get("wall_s"), "summary_stage_s": result.get("stage_s"),
        "registry": result.get("registry"), "evaluation": result.get("evaluation"),
        "total_process_s": time.monotonic() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(record, indent=1, default=str))
    lines = ["| stage | status | seconds | GPU busy |", "|---|---|---|---|"]
    for r in stages:
        busy = "" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {busy} |")
    busy = record["gpu_busy_flow"]
    lines.append(f"| **flow** | {record['status']} | {flow_s:.1f} | {'' if busy is None else f'{100 * busy:.0f}%'} |")
    print("\n".join(lines))
    print(f"stage sum {stage_s:.1f} s, orchestration overhead {flow_s - stage_s:.1f} s "
          f"({100 * record['overhead_share']:.1f}% of the flow); Prefect server start {server_s:.1f} s; "
          f"MLflow store creation {store_s:.1f} s; "
          f"model + data {prepared_s:.1f} s; device {record['device']}")


if __name__ == "__main__":
    main()
