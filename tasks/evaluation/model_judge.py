"""A local causal LM as a pairwise judge (``evaluation.judge_model``; ``gate.judge: model``).

The judge model reads ``judge_model.template`` filled with the prompt and two responses
(``{prompt}``, ``{response_a}``, ``{response_b}``; through its chat template as one user turn
when it has one) and its verdict is which of the two labels (``judge_model.labels``, default
``A``/``B``) it finds more likely as the next token: log p(label A) - log p(label B), each label's
probability summed over its spellings with and without a leading space. No sampling and no
answer parsing, so a verdict is deterministic and never unreadable.

Position bias: every comparison is asked in both orders (x as A then y as A). x wins when both
orders prefer x, loses when both prefer y, and it is a tie when the orders disagree, so a judge
that always answers "A" calls everything a tie rather than favouring whichever model is shown
first (as TRL's pairwise judges and common practice do).

Reliability: :func:`judge_accuracy` asks the judge about the held-out preference pairs (chosen vs
rejected, people's labels); the evaluation reports that accuracy with its interval, and the gate
trusts the judge only when the lower bound clears ``gate.min_judge_accuracy``. The verdicts are
only as good as the judge model: a small or unrelated model is near chance (and the gate then
says so); use a capable instruction-tuned model for real decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignment.config import StrictModel

LabelLogps = Callable[[list[str]], np.ndarray]
"""Judge texts -> ``[N, 2]`` log-probabilities of the two labels as the next token."""

DEFAULT_TEMPLATE = (
    "You are comparing two responses to the same prompt. Which response is better: more helpful, "
    "more accurate and better written?\n\nPrompt:\n{prompt}\n\nResponse A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\nAnswer with a single letter, A or B.\nAnswer:"
)


class JudgeModelSettings(StrictModel):
    """A local causal LM asked for pairwise verdicts (see :mod:`tasks.evaluation.model_judge`)."""

    name_or_path: str
    """Hub id or local folder of the judge (an ``AutoModelForCausalLM``); an instruction-tuned
    model judges far better than a base model."""
    template: str = DEFAULT_TEMPLATE
    """The question, with ``{prompt}``, ``{response_a}`` and ``{response_b}``; it should end where the
    answer label comes next."""
    labels: tuple[str, str] = ("A", "B")
    """The answers that mean "response A is better" and "response B is better" (one token each
    is best; only each label's first token is scored)."""
    max_length: int = 1024
    """Longest judge input in tokens; longer inputs keep their end (the responses and the question)."""
    batch_size: int = 8
    """Judge inputs per forward pass."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub (off unless you trust the repository)."""


def fill(template: str, prompt: Any, response_a: str, response_b: str) -> str:
    """The judge's question for one comparison (a chat prompt is shown as its turns' text)."""
    if isinstance(prompt, list):
        prompt = "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)
    return template.replace("{prompt}", str(prompt)).replace("{response_a}", response_a) \
                   .replace("{response_b}", response_b)


def verdicts(label_logps: LabelLogps, template: str, prompts: Sequence[Any], x: Sequence[str],
             y: Sequence[str]) -> np.ndarray:
    """Per comparison: 1.0 when x wins in both orders, 0.0 when y does, 0.5 when the orders disagree
    (or the judge finds the labels equally likely)."""
    n = len(prompts)
    if not (n == len(x) == len(y)):
        raise ValueError(f"verdicts needs as many x and y responses as prompts, got {n}, {len(x)}, {len(y)}")
    if n == 0:
        return np.zeros(0)
    texts = [fill(template, p, a, b) for p, a, b in zip(prompts, x, y, strict=True)]
    texts += [fill(template, p, b, a) for p, a, b in zip(prompts, x, y, strict=True)]
    lp = np.asarray(label_logps(texts), dtype=np.float64)
    margin = lp[:, 0] - lp[:, 1]  # > 0: the judge prefers response A
    x_first, x_second = np.sign(margin[:n]), -np.sign(margin[n:])  # +1: x preferred in that order
    return np.where((x_first > 0) & (x_second > 0), 1.0, np.where((x_first < 0) & (x_second < 0), 0.0, 0.5))


class ModelJudge:
    """A judge model loaded once; :meth:`label_logps` is its :data:`LabelLogps`."""

    def __init__(self, settings: JudgeModelSettings, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.name_or_path,
                                                       trust_remote_code=settings.trust_remote_code)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            settings.name_or_path, trust_remote_code=settings.trust_remote_code).to(device).eval()
        self.device = device
        self.label_ids = [self._spellings(label) for label in settings.labels]
        if self.label_ids[0] & self.label_ids[1]:
            raise ValueError(f"judge_model.labels {settings.labels} share a first token in this tokenizer; "
                             "pick labels that start differently")
        self._torch = torch

    def _spellings(self, label: str) -> set[int]:
        ids = set()
        for text in (label, " " + label):
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokens and tokens[0] != self.tokenizer.unk_token_id:
                ids.add(tokens[0])
        if not ids:
            raise ValueError(f"judge_model.labels: {label!r} has no token in the judge's vocabulary")
        return ids

    def _wrap(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def label_logps(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.settings.batch_size):
            chunk = [self._wrap(t) for t in texts[start:start + self.settings.batch_size]]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.settings.max_length).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1, :].float()  # left padding: the last position is the next token
            logp = torch.log_softmax(logits, dim=-1)
            cols = [torch.logsumexp(logp[:, sorted(ids)], dim=-1) for ids in self.label_ids]
            out.append(torch.stack(cols, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2))

    def verdicts(self, prompts: Sequence[Any], x: Sequence[str], y: Sequence[str]) -> np.ndarray:
        return verdicts(self.label_logps, self.settings.template, prompts, x, y)


def judge_accuracy(judge: ModelJudge | Any, pairs: Sequence[dict]) -> np.ndarray:
    """The judge's verdicts on held-out preference pairs, chosen as x: 1 agrees with people, 0 disagrees,
    0.5 a tie (its two orders disagree)."""
    from alignment.batching import decode_prompt

    prompts = [decode_prompt(p) for p in pairs]
    return judge.verdicts(prompts, [p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
