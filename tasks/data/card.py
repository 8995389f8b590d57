"""The data card of a preference build: counts, text lengths, agreement, annotators; JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.data.settings import PreferenceSettings


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Statistics of the character lengths of a text column (zeros when empty)."""
    n = np.asarray(lengths)
    if not len(n):
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {"mean": round(float(n.mean()), 2), "p50": float(np.percentile(n, 50)),
            "p90": float(np.percentile(n, 90)), "max": float(n.max())}


def build_card(lengths: dict, agreement: np.ndarray, annotators: list[str], stats, counts: dict, digest: str,
               source_digest: str, settings: PreferenceSettings) -> dict:
    """The card as a JSON-ready dict (``lengths``: :func:`length_stats` per text column of the pairs)."""
    rate = stats.agreement
    people = [
        {"annotator": name, "labels": int(stats.labels[i]), "ratings": int(stats.ratings[i]),
         "scored": int(stats.scored[i]),
         "agreement": None if np.isnan(rate[i]) else round(float(rate[i]), 4), "flagged": bool(stats.flagged[i]),
         "vote_factor": float(stats.factor[i])}
        for i, name in enumerate(annotators)
    ]
    return {
        "digest": digest,
        "source_digest": source_digest,
        "counts": counts,
        "lengths_chars": lengths,
        "agreement": {
            "mean": round(float(agreement.mean()), 4) if len(agreement) else None,
            "quantiles": {f"p{q}": round(float(np.percentile(agreement, q)), 4) for q in (10, 50, 90)}
            if len(agreement) else {},
            "share_unanimous": round(float((agreement >= 1.0).mean()), 4) if len(agreement) else None,
            "share_below_min": round(float((agreement < settings.min_agreement).mean()), 4) if len(agreement) else None,
        },
        "annotators": people,
        "settings": settings.model_dump(mode="json"),
    }


def render_markdown(card: dict) -> str:
    """Human-readable card."""
    c = card["counts"]
    lines = [f"# Preference dataset `{card['digest']}`", "", f"Source digest: `{card['source_digest']}`", "",
             "## Counts", "", "| what | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in c.items()]
    lines += ["", "## Lengths (characters)", "", "| column | mean | p50 | p90 | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['mean']} | {v['p50']} | {v['p90']} | {v['max']} |" for k, v in card["lengths_chars"].items()]
    a = card["agreement"]
    lines += ["", "## Agreement", "", f"mean {a['mean']}, quantiles {a['quantiles']}, unanimous share "
              f"{a['share_unanimous']}, below minimum {a['share_below_min']}", "",
              "## Annotators", "", "Agreement: share of an annotator's comparison and thumbs labels that match "
              "the majority of the other annotators on the same item (about 0.5 for random answers).", "",
              "| annotator | labels | ratings | scored | agreement | flagged | vote factor |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['annotator']} | {p['labels']} | {p['ratings']} | {p['scored']} | {p['agreement']} | "
              f"{'yes' if p['flagged'] else ''} | {p['vote_factor']} |" for p in card["annotators"]]
    return "\n".join(lines) + "\n"


def write_card(out: Path, lengths: dict, agreement: np.ndarray, annotators: list[str], stats, counts: dict,
               digest: str, source_digest: str, settings: PreferenceSettings) -> tuple[str, str]:
    """Write ``card.json`` and ``card.md`` into ``out``; return their paths."""
    card = build_card(lengths, agreement, annotators, stats, counts, digest, source_digest, settings)
    (out / "card.json").write_text(json.dumps(card, indent=2))
    (out / "card.md").write_text(render_markdown(card))
    return str(out / "card.json"), str(out / "card.md")
