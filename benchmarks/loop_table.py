"""The closed-loop demo's per-round table as Markdown, and its plot copied beside RESULTS.md.

Reads ``<home>/runs/<pipeline>/closed_loop_rounds.json`` and ``closed_loop_rounds.png``, written by
``alignflow demo --rounds N`` (flows/demo.py), and prints one Markdown row per round: the feedback
(rejected and kept samples with the draws, kept samples on prompts that keep at least two, the
preference pairs built), the candidate (oracle, KL to base, distinct-2 as a share of the base's,
repeated-trigram rise, the oracle's paired win rate against the champion it challenged with its 95%
interval, where the DPO drift budget stopped, the greedy looping share with its rise over the base
model's, the rise's paired standard error and the number of greedy prompts, the share of sampled
answers that end), the gate's verdict and the champion after the round.

    .venv/bin/python benchmarks/loop_table.py --home $ALIGNFLOW_HOME [--copy-plot benchmarks/results/loop/rounds.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flows.demo import greedy_cell


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _prompts(row: dict) -> str:
    return f", {row['greedy prompts']}" if row.get("greedy prompts") else ""


def markdown(data: dict) -> str:
    base = data.get("base_oracle")
    lines = ["| round | feedback from | rejected samples | kept samples (draws) | paired samples | pairs built | budget stop | cand. oracle | cand. KL | distinct-2 / base "
             "| rep-3 rise | greedy looping (rise ± SE, prompts) | answers ending | oracle win vs champion (95% CI) | promoted | champion | champion oracle (gain) | champion KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rounds"]:
        win = r.get("oracle win vs champion")
        gain = "" if r.get("oracle") is None or base is None else f" ({r['oracle'] - base:+.3f})"
        why = "" if r["promoted"] else f" ({r.get('why not') or ''})"[:90]
        draws = f" ({r['draws']})" if r.get("draws") else ""
        lines.append(
            f"| {r['round']} | {r['feedback from']} | {_f(r.get('rejected samples'), 'd')} "
            f"| {_f(r.get('kept samples'), 'd')}{draws} | {_f(r.get('paired samples'), 'd')} "
            f"| {_f(r.get('pairs built'), 'd')} | {r.get('budget stop') or '-'} "
            f"| {_f(r.get('candidate oracle'), '.3f')} | {_f(r.get('candidate KL'), '.2f')} "
            f"| {_f(r.get('distinct-2 / base'), '.0%')} | {_f(r.get('rep-3 rise'), '+.3f')} "
            f"| {greedy_cell(r)}{_prompts(r)} | {_f(r.get('answers ending'), '.2f')} "
            f"| {'-' if not win else f'{win[0]:.2f} ({win[1]:.2f}–{win[2]:.2f})'} "
            f"| {'yes' if r['promoted'] else 'no' + why} | {('v' + str(r['champion'])) if r.get('champion') else '-'} "
            f"| {_f(r.get('oracle'), '.3f')}{gain} | {_f(r.get('kl'), '.2f')} |")
    if base is not None:
        lines.append(f"\nBase model: mean oracle {base:.3f} on the held-out prompts.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="the demo's home (ALIGNFLOW_HOME)")
    parser.add_argument("--pipeline", default="demo")
    parser.add_argument("--copy-plot", help="copy closed_loop_rounds.png here")
    args = parser.parse_args()
    folder = Path(args.home) / "runs" / args.pipeline
    print(markdown(json.loads((folder / "closed_loop_rounds.json").read_text())))
    if args.copy_plot:
        Path(args.copy_plot).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "closed_loop_rounds.png", args.copy_plot)


if __name__ == "__main__":
    main()
