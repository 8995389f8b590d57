"""Word-level text statistics shared by training (the drift budget's probe, RL rollout logs) and
the pipeline's evaluation (tasks/evaluation/metrics.py re-exports them): one definition of a
"word" and of distinct-n, so a budget inside training reads what the gate reads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Lowercased words (``\\w+`` runs) and single punctuation marks: "Great!" -> ["great", "!"]."""
    return _WORD.findall(text.lower())


def tokenised(texts: Iterable, tokenize: Callable[[str], list] | None = None) -> list[list]:
    """Each text as its tokens (``tokenize``, default :func:`word_tokens`); token lists pass as they are."""
    tok = tokenize or word_tokens
    return [list(t) if not isinstance(t, str) else tok(t) for t in texts]


def ngrams(tokens: list, n: int) -> list[tuple]:
    """The n-grams of one token list, in order."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable, n: int, tokenize: Callable[[str], list] | None = None) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / all n-grams, pooled over all responses.

    ``texts`` are strings or token lists. 0.0 when no response has n tokens.
    """
    grams = [g for toks in tokenised(texts, tokenize) for g in ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0
