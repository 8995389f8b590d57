"""The demo's sentiment oracle: the VADER compound score of a response.

VADER (Hutto & Gilbert 2014) is a lexicon and rule based sentiment model; its compound score
lies in [-1, 1] (positive text scores high). The oracle scores the continuation only, never
the prompt, so a policy gains only by what it writes. Empty or whitespace-only responses
score 0. Broken text (U+FFFD from invalid UTF-8, or control characters) scores -1, the worst
score: people dislike it, and a policy must not gain by drifting into byte noise.

``reward_fn`` has the ``module:function`` signature that RL recipes accept as a reward
(``tasks.demo.oracle:reward_fn``), so PPO/GRPO can also be run against the oracle directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

BROKEN_SCORE = -1.0
_BROKEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def is_broken(text: str) -> bool:
    """Text holds U+FFFD (decoded from invalid UTF-8) or C0 control characters other than tab/newline/CR."""
    return _BROKEN.search(text) is not None


def strip_broken(text: str) -> str:
    """``text`` without the characters :func:`is_broken` looks for, whitespace runs collapsed."""
    return " ".join(_BROKEN.sub("", text).split())


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    # Loading the lexicon takes ~0.1 s; share one analyzer per process (it holds no state).
    return SentimentIntensityAnalyzer()


def sentiment(responses: Sequence[str]) -> np.ndarray:
    """VADER compound score of each response, float64 array of shape ``[len(responses)]``.

    Raises TypeError naming the index of a response that is not a string.
    """
    analyzer = _analyzer()
    out = np.zeros(len(responses), dtype=np.float64)
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise TypeError(f"response {i} is {type(text).__name__}, expected str")
        if is_broken(text):
            out[i] = BROKEN_SCORE
        elif text.strip():
            out[i] = analyzer.polarity_scores(text)["compound"]
    return out


def reward_fn(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Oracle reward of (prompt, response) pairs: the response's compound score (prompt unused)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return sentiment(responses).tolist()
