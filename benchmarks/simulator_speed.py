"""Time one simulated feedback batch of the demo (``make run``'s simulate stage) on a demo home's base model.

Samples, labels and writes the batch exactly as the stage does (the demo config's simulator settings and
seed, the home's prompt table) into a scratch landing folder, and prints the batch's seconds, the share of
them spent in generation, and its kept and rejected samples. ``--profile`` prints the top of a cProfile
listing instead of timing quietly (slower).

    .venv/bin/python benchmarks/simulator_speed.py --home .alignflow --repeats 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks.demo.simulator as simulator  # noqa: E402
from tasks.config import load_pipeline_config  # noqa: E402
from tasks.stages.demo import demo_base_model, demo_settings, prompt_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="a demo home after `make run` (ALIGNFLOW_HOME)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config overrides, e.g. demo.cache_dir=<a cache elsewhere>")
    args = parser.parse_args()
    home = Path(args.home)
    cfg = load_pipeline_config(None, [f"pipeline.home={home}", *args.overrides])
    settings = demo_settings(cfg).simulator
    record = demo_base_model(cfg)  # the stage's own lookups: the cached base model and prompt table
    base, prompts = record.path, prompt_table(cfg, record)["prompt"].tolist()
    sampling = {"s": 0.0}
    sample = simulator.sample_responses

    def timed_sample(*a, **k):
        t = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            sampling["s"] += time.perf_counter() - t

    simulator.sample_responses = timed_sample
    for i in range(args.repeats):
        landing = Path(tempfile.mkdtemp(prefix="simulator-speed-"))
        sampling["s"] = 0.0
        profile = cProfile.Profile() if args.profile else None
        started = time.perf_counter()
        if profile:
            profile.enable()
        report = simulator.simulate_feedback(base, prompts, settings, landing, batch_id="speed", seed=settings.seed)
        if profile:
            profile.disable()
        total = time.perf_counter() - started
        shutil.rmtree(landing, ignore_errors=True)
        print(json.dumps({"repeat": i, "seconds": round(total, 2), "generation_seconds": round(sampling["s"], 2),
                          "kept": report.kept_samples, "rejected": report.rejected_samples,
                          "draws": report.draws, "base": str(base)}), flush=True)
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
