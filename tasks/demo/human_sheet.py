"""Simulated people fill a human-evaluation sheet (:mod:`tasks.evaluation.human`): the demo's
stand-in for handing the sheet to raters, and how the round trip is tested.

Each item gets ``labels_per_item`` votes from distinct annotators of the simulator's team
(drawn by weight), each choosing as on the demo's pairwise feedback: ``a`` with probability
sigmoid((s_a - s_b) / temperature) on the VADER oracle's scores, ``tie`` when the scores are
within ``tie_threshold`` (spammers answer at random). A filled item becomes one row per vote.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.demo import annotators as ann
from tasks.demo.oracle import sentiment
from tasks.demo.settings import SimulatorSettings


def fill_sheet(sheet: pd.DataFrame, settings: SimulatorSettings, seed: int = 0) -> pd.DataFrame:
    """The sheet's rows, one per vote, with ``choice`` and ``annotator_id`` filled in."""
    rng = np.random.default_rng(seed)
    team = settings.annotators
    weights = np.array([a.weight for a in team]) / sum(a.weight for a in team)
    per_item = min(settings.labels_per_item, len(team))
    s_a, s_b = sentiment(sheet["response_a"].tolist()), sentiment(sheet["response_b"].tolist())
    rows = []
    for row, a, b in zip(sheet.to_dict("records"), s_a, s_b, strict=True):
        for idx in rng.choice(len(team), size=per_item, replace=False, p=weights):
            who = team[int(idx)]
            p_a = float(ann.preference_probability(np.array([a]), np.array([b]), who)[0])
            tie = not who.spammer and abs(a - b) <= settings.tie_threshold
            rows.append({**row, "choice": "tie" if tie else ("a" if rng.random() < p_a else "b"),
                         "annotator_id": who.id})
    return pd.DataFrame(rows, columns=list(sheet.columns))
