"""PNG plots of evaluation results, written with matplotlib's object API (Agg; no pyplot state,
safe in worker threads). Each function writes one file, creating its folder, and returns the path."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Point = tuple[str, float, float]
"""(label, KL in nats, reward)."""

TRAINING_KEYS = ("loss", "rewards/accuracy", "rewards/margin", "accuracy", "margin", "kl", "reward/raw",
                 "grad_norm")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_score_distributions(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """One histogram panel per judge (``{"reward model": {"candidate": [...], "champion": [...]}, "oracle": ...}``),
    one translucent histogram per model with its mean marked. Raises ValueError with no scores."""
    panels = {judge: {m: list(v) for m, v in models.items() if len(v)} for judge, models in panels.items()}
    panels = {j: m for j, m in panels.items() if m}
    if not panels:
        raise ValueError("no scores to plot")
    fig = Figure(figsize=(5.5 * len(panels), 3.8))
    for i, (judge, models) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        lo = min(min(v) for v in models.values())
        hi = max(max(v) for v in models.values())
        bins = [lo + (hi - lo) * k / 30 for k in range(31)] if hi > lo else 10
        for name, values in models.items():
            mean = sum(values) / len(values)
            patches = ax.hist(values, bins=bins, alpha=0.45, label=f"{name} (mean {mean:.3f})")[2]
            ax.axvline(mean, color=patches[0].get_facecolor(), alpha=1.0, linestyle="--")
        ax.set_title(f"{judge} scores")
        ax.set_xlabel("score")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
    return _save(fig, path)


SCORE_AXES = {
    "oracle_mean": ("mean oracle score (the demo's VADER sentiment judge)", "Oracle score vs KL"),
    "reward_mean": ("mean reward-model score", "Reward-model score vs KL"),
}
"""Y-axis label and title of the frontier plot per judge: the demo's oracle is not the reward model."""


def plot_reward_vs_kl(points: Sequence[Point] | Mapping[str, Sequence[Point]], path: str | Path, *,
                      xlabel: str = "KL(policy ‖ reference), nats", ylabel: str = SCORE_AXES["reward_mean"][0],
                      title: str = SCORE_AXES["reward_mean"][1]) -> Path:
    """A judge's score against KL, one labelled point per model version; a mapping draws one
    connected series per key (e.g. ``{"DPO (β sweep)": [...], "PPO (KL coef sweep)": [...]}``: a
    frontier). Name the judge in ``ylabel``/``title`` (:data:`SCORE_AXES`)."""
    series = dict(points) if isinstance(points, Mapping) else {"": list(points)}
    if not any(series.values()):
        raise ValueError("no points to plot")
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda p: p[1])
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, marker="o", linestyle="-" if name else ":", label=name or None)
        for label, x, y in pts:
            ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend(fontsize=8)
    return _save(fig, path)


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Records of a recipe's metrics.jsonl (ARCHITECTURE.md); a torn last line is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written while we read
    return rows


def plot_training_curves(metrics_jsonl: str | Path, path: str | Path, keys: Sequence[str] | None = None) -> Path:
    """One panel per metric found in ``metrics.jsonl`` (default: loss, accuracies, margins, KL,
    reward, grad norm), against ``step``: train as a line, eval as markers. Raises ValueError
    when none of the keys occurs."""
    rows = read_metrics_jsonl(metrics_jsonl)
    wanted = list(keys or TRAINING_KEYS)
    present = [k for k in wanted if any(_finite(r.get(k)) for r in rows)]
    if not present:
        raise ValueError(f"{metrics_jsonl}: none of {wanted} is logged")
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * nrows))
    for i, key in enumerate(present):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for phase, style in (("train", "-"), ("eval", "o")):
            pts = [(r["step"], r[key]) for r in rows
                   if r.get("phase", "train") == phase and _finite(r.get(key)) and "step" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=phase, markersize=4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_closed_loop(rounds: Sequence[Mapping[str, float]], path: str | Path, *, baseline: float | None = None,
                     metric: str = "oracle", label: str = "champion mean oracle reward") -> Path:
    """The closed-loop demo: the champion's ``metric`` per round (rows with ``round`` and
    ``metric``, optionally ``kl`` drawn on a second axis and ``promoted`` marking rounds whose
    candidate was promoted), with the base model's value as a dashed line (per round where rows
    carry ``base oracle``: :func:`base_line`)."""
    rows = sorted(rounds, key=lambda r: r["round"])
    if not rows:
        raise ValueError("no rounds to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = [r["round"] for r in rows], [r[metric] for r in rows]
    ax.plot(xs, ys, marker="o", label=label)
    promoted = [(r["round"], r[metric]) for r in rows if r.get("promoted")]
    if promoted:
        ax.scatter([p[0] for p in promoted], [p[1] for p in promoted], s=90, facecolors="none",
                   edgecolors="green", label="promoted")
    _draw_base_line(ax, rows, baseline)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    if any(_finite(r.get("kl")) for r in rows):
        ax2 = ax.twinx()
        kl = [(r["round"], r["kl"]) for r in rows if _finite(r.get("kl"))]
        ax2.plot([k[0] for k in kl], [k[1] for k in kl], marker="s", color="tab:red", alpha=0.6, label="KL to base")
        ax2.set_ylabel("KL to base (nats)")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Closed loop: champion per round")
    return _save(fig, path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def base_line(rows: Sequence[Mapping], baseline: float | None) -> list[tuple[float, float]]:
    """The base model's oracle per round, as ``(round, value)`` points: each row's ``base oracle``
    (the base on that round's evaluated prompts; rounds may evaluate on different prompt sets),
    else ``baseline`` at every round; empty when neither is known."""
    points = [(r["round"], r["base oracle"]) for r in rows if _finite(r.get("base oracle"))]
    if points:
        return points
    return [(r["round"], baseline) for r in rows] if baseline is not None else []


def _draw_base_line(ax, rows: Sequence[Mapping], baseline: float | None) -> None:
    """:func:`base_line` as a dashed grey step line on ``ax`` (nothing when it is empty)."""
    base = base_line(rows, baseline)
    if base:
        ax.plot([p[0] for p in base], [p[1] for p in base], linestyle="--", color="grey", drawstyle="steps-mid",
                label=f"base model, on each round's prompts ({base[-1][1]:.3f} last)")


def plot_loop_rounds(rows: Sequence[Mapping], path: str | Path, *, baseline: float | None = None,
                     max_kl: float | None = None) -> Path:
    """The closed loop round by round: oracle (left) and KL to the base model (right) of each
    round's candidate, promoted ones filled, rejected ones as crosses, and the champion after
    the round as a line. Rows carry ``round``, ``candidate oracle``, ``candidate KL``,
    ``promoted``, ``oracle`` and ``kl`` (the champion's; None before the first promotion), and
    optionally ``base oracle``: the base model's line follows it (:func:`base_line`)."""
    rows = sorted(rows, key=lambda r: r["round"])
    if not rows:
        raise ValueError("no rounds to plot")
    fig = Figure(figsize=(10, 4))
    for i, (cand, champ, title) in enumerate((("candidate oracle", "oracle", "mean oracle sentiment (held-out)"),
                                              ("candidate KL", "kl", "KL to base (nats/sequence)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        line = [(r["round"], r[champ]) for r in rows if _finite(r.get(champ))]
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:blue", marker="o", label="champion")
        for promoted, style in ((True, {"marker": "o", "color": "tab:green", "s": 70}),
                                (False, {"marker": "x", "color": "tab:red", "s": 70})):
            pts = [(r["round"], r[cand]) for r in rows if _finite(r.get(cand)) and bool(r.get("promoted")) == promoted]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=3,
                           label="candidate, promoted" if promoted else "candidate, rejected", **style)
        if i == 0:
            _draw_base_line(ax, rows, baseline)
        if i == 1 and max_kl is not None:
            ax.axhline(max_kl, linestyle=":", color="tab:red", label=f"gate KL budget ({max_kl:g})")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([r["round"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
