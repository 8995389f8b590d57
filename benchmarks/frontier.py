"""Reward–KL frontier on the demo task (the DPO paper's sentiment experiment, at demo scale).

Sweeps β for DPO (and, with ``--kto-betas``, KTO on the unpaired set), and runs PPO and GRPO
points (``--ppo`` / ``--grpo``: one run per argument, each a comma-separated list of overrides
of the method's config section; ``--kl-coefs`` is shorthand for ``--ppo kl.coef=C``) on one
simulated feedback batch from the demo base model, evaluates every policy on the gate's held-out
prompts (``evaluation.prompt_splits``: mean VADER sentiment = the oracle, KL to the base model at the
sampling temperature) and prints a Markdown table with each run's training wall time; writes the plot
``frontier.png`` and ``frontier.json`` into the home folder.

    python benchmarks/frontier.py --home /tmp/frontier
    python benchmarks/frontier.py --betas 0.05 0.1 0.3 1 --kl-coefs 0.01 0.05 0.2 --ppo-steps 40
    python benchmarks/frontier.py --betas --kl-coefs --ppo kl.coef=0.02 --grpo kl.coef=0.02,group_size=8 \
        --reward-model <a reward folder> --reuse <an earlier frontier.json>

``--reward-model`` pins the PPO/GRPO reward to a trained reward folder (else the demo's reward
stage trains one, cached, started like the demo's from the offline reward model when ``demo.offline`` is on); ``--reuse`` copies earlier runs' rows (frontier.json files) of points
not run here into the table and plot (taken on the same machine and data, or the comparison is
void); ``--plot-only`` runs nothing and draws the reused rows. ``--set pipeline.seed=N`` trains
with another seed (rollouts, minibatch order; each row records its seed): give it its own
``--home``, where the simulator (``demo.simulator.seed``) writes the same feedback batch again.
It seeds the reward stage too; ``--ppo seed=N`` (``--grpo seed=N``) seeds that RL run alone, with
the same data and reward model.
Training runs are cached by their inputs (re-running the script re-evaluates only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tasks.config import load_pipeline_config  # noqa: E402
from tasks.demo.oracle import sentiment  # noqa: E402
from tasks.evaluation.plots import plot_reward_vs_kl  # noqa: E402
from tasks.evaluation.suite import evaluate_models  # noqa: E402
from tasks.records import ModelRecord  # noqa: E402
from tasks.stages.data import run_build, run_ingest  # noqa: E402
from tasks.stages.demo import (  # noqa: E402
    demo_base_model,
    landing_is_empty,
    reward_start,
    simulate_round,
)
from tasks.stages.evaluate import evaluation_inputs  # noqa: E402
from tasks.stages.train import train_stage  # noqa: E402
from tasks.versioning import digest_of  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="pipeline config (default: the embedded demo)")
    p.add_argument("--home", default="/tmp/alignflow-frontier", help="home folder for data, runs and outputs")
    p.add_argument("--betas", type=float, nargs="*", default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--kl-coefs", type=float, nargs="*", default=[0.02, 0.05, 0.2])
    p.add_argument("--ppo-steps", type=int, default=None, help="PPO iterations per run (default: the config's)")
    p.add_argument("--ppo", action="append", default=[], metavar="K=V[,K=V...]",
                   help="a PPO run with these overrides of the ppo section (repeatable)")
    p.add_argument("--grpo", action="append", default=[], metavar="K=V[,K=V...]",
                   help="a GRPO run with these overrides of the grpo section (repeatable)")
    p.add_argument("--reward-model", default=None, help="reward folder for PPO/GRPO (default: train the demo's)")
    p.add_argument("--reuse", nargs="*", default=[], help="earlier frontier.json files: their rows of points not run here")
    p.add_argument("--plot-only", action="store_true", help="run nothing: table and plot of the --reuse rows")
    p.add_argument("--kto-betas", type=float, nargs="*", default=[],
                   help="KTO runs (unpaired: the build's unpaired-train set) at these betas")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    home = Path(args.home)
    started = time.monotonic()
    rows = [] if args.plot_only else run_points(args, home)
    for path in args.reuse:
        seen = {_key(r) for r in rows}
        rows += [{**r, "reused_from": r.get("reused_from", path)} for r in json.loads(Path(path).read_text())
                 if _key(r) not in seen]
    report(rows, home)
    print(f"{len(rows)} points in {time.monotonic() - started:.0f} s")


def _key(row: dict) -> tuple:
    """A point's identity: method, setting (β, KL coefficient or override list) and training seed."""
    return row["method"], row.get("beta"), row.get("kl_coef"), row.get("setting"), row.get("seed", 0)


def run_points(args: argparse.Namespace, home: Path) -> list[dict]:
    """Train (cached) and evaluate every requested point; the base model's row first."""
    base_overrides = [f"pipeline.home={home}", "pipeline.device=cpu", *args.overrides]
    cfg = load_pipeline_config(args.config, base_overrides)
    base = demo_base_model(cfg)
    if landing_is_empty(cfg):
        simulate_round(cfg, base, base, round_index=0)
    ingest = run_ingest(cfg, None)
    dataset = run_build(cfg, ingest, None)
    if args.reward_model:
        reward = ModelRecord(stage="reward", path=args.reward_model, digest=digest_of("pinned", args.reward_model))
    else:  # as the demo's reward stage: started from the offline reward model when demo.offline is on
        reward = train_stage(cfg, "reward", dataset.files, dataset.digest, reward_start(cfg, base), None)
    prompts, pairs = evaluation_inputs(cfg, dataset, base)  # the gate's: evaluation.prompt_splits, test pairs

    rows = []

    def evaluate(method: str, knob: str, value: float | str, model: ModelRecord, train_s: float,
                 seed: int | None = None) -> None:
        out = evaluate_models(model.path, None, base.path, prompts, pairs, reward_model=reward.path,
                              oracle=lambda texts: sentiment(texts), settings=cfg.evaluation, device="cpu")
        c = out.report.candidate
        rows.append({"method": method, knob: value, "kl": c.kl, "kl_se": c.kl_se, "oracle": c.oracle_mean,
                     "oracle_se": c.oracle_std / len(prompts) ** 0.5, "reward": c.reward_mean, "malformed": c.malformed_share, "distinct_2": c.distinct_2,
                     "train_s": train_s, "seed": cfg.pipeline.seed if seed is None else seed, **_train_summary(model)})
        print(f"{method} {knob}={value}: KL {c.kl:.2f} ± {c.kl_se:.2f}, oracle {c.oracle_mean:+.3f}, "
              f"distinct-2 {c.distinct_2:.3f}, trained in {train_s:.0f} s", flush=True)

    def train(run_cfg, stage: str, **kw) -> tuple[ModelRecord, float]:
        t0 = time.monotonic()
        model = train_stage(run_cfg, stage, dataset.files, dataset.digest, base, None, **kw)
        # the training's own wall time (its summary.json's), not a finished run's reload seconds
        return model, float((model.summary or {}).get("wall_time_s", time.monotonic() - t0))

    ref = evaluate_models(base.path, None, base.path, prompts, pairs, oracle=lambda t: sentiment(t),
                          settings=cfg.evaluation, device="cpu").report.candidate
    rows.append({"method": "base", "kl": 0.0, "kl_se": 0.0, "oracle": ref.oracle_mean, "reward": None,
                 "malformed": ref.malformed_share, "distinct_2": ref.distinct_2})
    for beta in args.betas:
        run = load_pipeline_config(args.config, [*base_overrides, f"dpo.beta={beta}", "pipeline.init_from=base"])
        evaluate("DPO", "beta", beta, *train(run, "dpo"))
    for beta in args.kto_betas:
        run = load_pipeline_config(args.config, [*base_overrides, "pipeline.method=kto", f"kto.beta={beta}",
                                                 "pipeline.init_from=base"])
        evaluate("KTO", "beta", beta, *train(run, "kto"))
    rl_runs = [("ppo", f"kl.coef={c}") for c in args.kl_coefs]
    rl_runs += [("ppo", spec) for spec in args.ppo] + [("grpo", spec) for spec in args.grpo]
    for stage, spec in rl_runs:
        sets = [item.strip() for item in spec.split(",") if item.strip()]
        steps = [f"ppo.max_steps={args.ppo_steps}"] if stage == "ppo" and args.ppo_steps else []
        run = load_pipeline_config(args.config, [*base_overrides, f"pipeline.method={stage}", *steps,
                                                 *(f"{stage}.{item}" for item in sets)])
        # the stage's own seed (``--ppo seed=1``: that run alone on another seed, the reward model and data kept)
        evaluate(stage.upper(), "setting", spec, *train(run, stage, reward=reward), seed=getattr(run, stage).seed)
    return rows


def report(rows: list[dict], home: Path) -> None:
    """``frontier.png`` and ``frontier.json`` in ``home``; the Markdown table on stdout (every row).
    A row with ``"plot": false`` (set in a reused JSON: an older variant) stays out of the plot."""
    home.mkdir(parents=True, exist_ok=True)
    plot = _plot([r for r in rows if r.get("plot", True)], home)
    (home / "frontier.json").write_text(json.dumps(rows, indent=2))
    print(f"\n(torch threads: {torch.get_num_threads()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    curve = frontier_curve(rows)
    print("| method | setting | KL to base (nats/seq) | oracle sentiment | malformed | distinct-2 | train s "
          "| DPO frontier at that KL | gap | between |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        setting = (f"β={r['beta']}" if "beta" in r else f"c={r['kl_coef']}" if "kl_coef" in r
                   else f"{r['series']}: {r['label']}" if r.get("series") and r.get("label")
                   else r.get("series") or r.get("setting", "-"))
        if r.get("seed"):
            setting += f" (seed {r['seed']})"
        train_s = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "-"
        at = frontier_at(curve, r["kl"]) if r["method"] not in ("base", "DPO") else None
        gap = "- | - | -" if at is None else f"{at:+.3f} | {r['oracle'] - at:+.3f} | {bracket(curve, r['kl'])}"
        print(f"| {r['method']} | {setting} | {r['kl']:.2f} ± {r['kl_se']:.2f} | {r['oracle']:+.3f} | "
              f"{r['malformed']:.3f} | {r['distinct_2']:.3f} | {train_s} | {gap} |")
    print(f"\nplot: {plot}")


def _plot(rows: list[dict], home: Path) -> Path:
    """``frontier.png`` in ``home``: the base model, the DPO and KTO β sweeps as lines, PPO and GRPO
    points, and any series a reused row names."""
    series = {
        "base": [("base", 0.0, r["oracle"]) for r in rows if r["method"] == "base"][:1],
        "DPO (β sweep)": sorted(((f"β={r['beta']}", r["kl"], r["oracle"]) for r in rows if r["method"] == "DPO"),
                               key=lambda point: -point[1]),  # drawn as one line, from high KL to the base
        "KTO (β sweep)": [(f"β={r['beta']}", r["kl"], r["oracle"]) for r in rows if r["method"] == "KTO"],
    }
    if series["DPO (β sweep)"]:  # the frontier starts at the base model (β → ∞)
        series["DPO (β sweep)"] += series.pop("base")
        hull = set(frontier_curve(rows))  # the line is the frontier the gaps use; a β under it is its own point
        for label, kl, oracle in [p for p in series["DPO (β sweep)"] if (p[1], p[2]) not in hull]:
            series["DPO (β sweep)"].remove((label, kl, oracle))
            series[f"DPO {label}, under the hull"] = [(label, kl, oracle)]
    for method in ("PPO", "GRPO"):
        pts = [r for r in rows if r["method"] == method and not r.get("series")]
        series[method] = [(_short_label(r), r["kl"], r["oracle"]) for r in pts]
    for r in rows:  # a row may name its own series (e.g. one per RL variant, set in a reused JSON)
        if r.get("series"):
            series.setdefault(r["series"], []).append((_short_label(r), r["kl"], r["oracle"]))
    series = {k: v for k, v in series.items() if v}
    return plot_reward_vs_kl(series, home / "frontier.png", ylabel="mean VADER sentiment (oracle)",
                             title="Reward–KL frontier on the demo task")


def frontier_curve(rows: list[dict]) -> list[tuple[float, float]]:
    """The DPO frontier as (KL, oracle) points sorted by KL: the upper concave hull of the base
    model (KL 0) and every DPO row (the β sweep). Where several β land at about one KL (high β: three
    epochs fit the pairs at any β), their oracles differ by noise, and a line through all of them
    zigzags; the hull keeps the upper ones, so a gap against it is never flattered by a low DPO
    point. On a concave sweep it is the line through every point. Empty without a base row and at
    least one DPO row."""
    base = [(0.0, r["oracle"]) for r in rows if r["method"] == "base"][:1]
    dpo = [(r["kl"], r["oracle"]) for r in rows if r["method"] == "DPO"]
    return upper_hull(base + dpo) if base and dpo else []


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper concave hull of (x, y) points, sorted by x (Andrew's monotone chain, upper half):
    the points no chord of two others lies above."""
    hull: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if hull and hull[-1][0] == x:  # the same KL twice: the higher oracle (sorted first) stays
            continue
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (y - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (x - hull[-2][0])) >= 0:
            hull.pop()  # the last point lies on or under the chord from the one before it to this one
        hull.append((x, y))
    return hull


def frontier_at(curve: list[tuple[float, float]], kl: float) -> float | None:
    """The frontier's oracle at ``kl``: linear between the two measured points around it (a concave
    frontier lies above its chords, so this slightly flatters points between two DPO points).
    None outside the measured KL range or without a curve."""
    for (k0, o0), (k1, o1) in zip(curve, curve[1:], strict=False):
        if k0 <= kl <= k1:
            return o0 if k1 == k0 else o0 + (o1 - o0) * (kl - k0) / (k1 - k0)
    return None


def bracket(curve: list[tuple[float, float]], kl: float) -> str:
    """The two measured frontier points around ``kl`` (their KLs), marked ``chord from the base``
    when the lower one is the base model: below the lowest DPO point the frontier is only the chord
    from the base, which a concave curve lies above, so a gap measured there is no gap."""
    for (k0, _), (k1, _) in zip(curve, curve[1:], strict=False):
        if k0 <= kl <= k1:
            return f"{k0:.2f}–{k1:.2f}" + (" (chord from the base)" if k0 == 0.0 else "")
    return "outside"


def _short_label(row: dict) -> str:
    """A plot label for an RL point: its KL setting (coefficient or adaptive target) when named."""
    spec = str(row.get("setting", ""))
    if row.get("label"):
        return str(row["label"])
    if "kl_coef" in row:
        return f"c={row['kl_coef']}"
    picked = [item.split("=", 1)[1] for item in spec.split(",") if item.strip().startswith(("kl.coef=", "kl.target="))]
    return ("KL→" if "kl.target=" in spec else "c=") + picked[-1] if picked else spec[:18]


_WATCHED = ("kl", "kl_coef", "reward/raw", "reward/raw_std", "reward/token_baseline", "entropy", "entropy_coef",
            "clipfrac", "approx_kl", "explained_variance", "explained_variance_last", "loss/value", "response_length",
            "eos_rate", "distinct_2", "grad_norm", "reward/group_std", "groups_without_signal", "loss/kl", "ratio",
            "advantage/first_token_abs", "advantage/token_abs", "reward/dense_gap")
"""RL metrics that reveal a silent failure (a critic that learns nothing, steps too large or too small; for
GRPO the within-group spread of the normalised scores, whose std-scaling amplifies groups of near-equal
samples, and the share of groups with no signal at all; with ``process_reward`` the credit per token and
the gap between the rollout's summed token scores and its sequence scores)."""


def _train_summary(model: ModelRecord) -> dict:
    """Steps, the last logged RL metrics of a run (from its summary) and their means over the
    second half of its training steps (from metrics.jsonl beside ``final/``: the last step alone
    sits at the end of the lr schedule, where clipfrac and approx_kl are ~0 by construction)."""
    summary = model.summary or {}
    metrics = summary.get("metrics") or {}
    out = {"steps": summary.get("steps"), "final": {k: metrics[k] for k in _WATCHED if k in metrics}}
    log = Path(model.path).parent / "metrics.jsonl"
    if log.is_file():
        train = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("phase") == "train"]
        late = train[len(train) // 2:]
        out["second_half"] = {k: sum(r[k] for r in late) / len(late) for k in _WATCHED
                              if late and all(isinstance(r.get(k), (int, float)) for r in late)}
    return out


if __name__ == "__main__":
    main()
