"""Reward–KL frontier on the demo task (the DPO paper's sentiment experiment, at demo scale).

Sweeps β for DPO (and, with ``--kto-betas``, KTO on the unpaired set) and the KL coefficient
for PPO on one simulated feedback batch from the demo
base model, evaluates every policy on the held-out prompts (mean VADER sentiment = the oracle,
KL to the base model at the sampling temperature) and prints a Markdown table; writes the plot
``frontier.png`` and ``frontier.json`` into the home folder.

    python benchmarks/frontier.py --home /tmp/frontier
    python benchmarks/frontier.py --betas 0.05 0.1 0.3 1 --kl-coefs 0.01 0.05 0.2 --ppo-steps 40

Training runs are cached by their inputs (re-running the script re-evaluates only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402

from alignment.batching import decode_prompt  # noqa: E402
from tasks.config import load_pipeline_config  # noqa: E402
from tasks.demo.oracle import sentiment  # noqa: E402
from tasks.evaluation.plots import plot_reward_vs_kl  # noqa: E402
from tasks.evaluation.suite import evaluate_models  # noqa: E402
from tasks.stages.data import run_build, run_ingest  # noqa: E402
from tasks.stages.demo import demo_base_model, heldout_prompts, landing_is_empty, simulate_round  # noqa: E402
from tasks.stages.train import train_stage  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="pipeline config (default: the embedded demo)")
    p.add_argument("--home", default="/tmp/alignflow-frontier", help="home folder for data, runs and outputs")
    p.add_argument("--betas", type=float, nargs="*", default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--kl-coefs", type=float, nargs="*", default=[0.02, 0.05, 0.2])
    p.add_argument("--ppo-steps", type=int, default=30, help="PPO iterations per run")
    p.add_argument("--kto-betas", type=float, nargs="*", default=[],
                   help="KTO runs (unpaired: the build's unpaired-train set) at these betas")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    home = Path(args.home)
    base_overrides = [f"pipeline.home={home}", "pipeline.device=cpu", *args.overrides]
    cfg = load_pipeline_config(args.config, base_overrides)
    started = time.monotonic()
    base = demo_base_model(cfg)
    if landing_is_empty(cfg):
        simulate_round(cfg, base, base, round_index=0)
    ingest = run_ingest(cfg, None)
    dataset = run_build(cfg, ingest, None)
    reward = train_stage(cfg, "reward", dataset.files, dataset.digest, base, None)
    prompts = heldout_prompts(cfg, base)
    pairs_file = dataset.files.get("pairs-test")
    pairs = pd.read_parquet(pairs_file) if pairs_file else None
    prompts = [decode_prompt({"prompt": p, "is_chat": False}) for p in prompts]

    rows = []

    def evaluate(method: str, knob: str, value: float, model_path: str) -> None:
        out = evaluate_models(model_path, None, base.path, prompts, pairs, reward_model=reward.path,
                              oracle=lambda texts: sentiment(texts), settings=cfg.evaluation, device="cpu")
        c = out.report.candidate
        rows.append({"method": method, knob: value, "kl": c.kl, "kl_se": c.kl_se, "oracle": c.oracle_mean,
                     "reward": c.reward_mean, "malformed": c.malformed_share, "distinct_2": c.distinct_2})
        print(f"{method} {knob}={value}: KL {c.kl:.2f} ± {c.kl_se:.2f}, oracle {c.oracle_mean:+.3f}", flush=True)

    ref = evaluate_models(base.path, None, base.path, prompts, pairs, oracle=lambda t: sentiment(t),
                          settings=cfg.evaluation, device="cpu").report.candidate
    rows.append({"method": "base", "kl": 0.0, "kl_se": 0.0, "oracle": ref.oracle_mean, "reward": None,
                 "malformed": ref.malformed_share, "distinct_2": ref.distinct_2})
    for beta in args.betas:
        run = load_pipeline_config(args.config, [*base_overrides, f"dpo.beta={beta}", "pipeline.init_from=base"])
        model = train_stage(run, "dpo", dataset.files, dataset.digest, base, None)
        evaluate("DPO", "beta", beta, model.path)
    for beta in args.kto_betas:
        run = load_pipeline_config(args.config, [*base_overrides, "pipeline.method=kto", f"kto.beta={beta}",
                                                 "pipeline.init_from=base"])
        model = train_stage(run, "kto", dataset.files, dataset.digest, base, None)
        evaluate("KTO", "beta", beta, model.path)
    for coef in args.kl_coefs:
        run = load_pipeline_config(args.config, [*base_overrides, f"ppo.kl.coef={coef}",
                                                 f"ppo.max_steps={args.ppo_steps}"])
        model = train_stage(run, "ppo", dataset.files, dataset.digest, base, None, reward=reward)
        evaluate("PPO", "kl_coef", coef, model.path)

    series = {
        "DPO (β sweep)": [(f"β={r['beta']}", r["kl"], r["oracle"]) for r in rows if r["method"] == "DPO"],
        "PPO (KL-coefficient sweep)": [(f"c={r['kl_coef']}", r["kl"], r["oracle"]) for r in rows
                                       if r["method"] == "PPO"],
        "KTO (β sweep)": [(f"β={r['beta']}", r["kl"], r["oracle"]) for r in rows if r["method"] == "KTO"],
        "base": [("base", 0.0, ref.oracle_mean)],
    }
    plot = plot_reward_vs_kl(series, home / "frontier.png", ylabel="mean VADER sentiment (oracle)",
                             title="Reward–KL frontier on the demo task")
    (home / "frontier.json").write_text(json.dumps(rows, indent=2))
    print("\n| method | setting | KL to base (nats/seq) | oracle sentiment | malformed | distinct-2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        setting = f"β={r['beta']}" if "beta" in r else (f"c={r['kl_coef']}" if "kl_coef" in r else "-")
        print(f"| {r['method']} | {setting} | {r['kl']:.2f} ± {r['kl_se']:.2f} | {r['oracle']:+.3f} | "
              f"{r['malformed']:.3f} | {r['distinct_2']:.3f} |")
    print(f"\nplot: {plot}; {len(rows)} points in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
