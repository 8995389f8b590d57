"""A drift budget for one training run: stop early when the policy's own samples show it has
moved too far from a reference model or lost too much diversity.

Every ``budget.every`` optimizer steps a probe samples the policy on a fixed set of training
prompts (same seed each time) and measures

* the sequence KL to the reference model, KL(π ‖ π_ref) ≈ mean_i Σ_t [log π(y_t) − log π_ref(y_t)]
  over samples y⁽ⁱ⁾ ~ π, both log-probs at the sampling temperature (the estimator the
  evaluation uses, so a budget in nats means what the gate's ``max_kl`` means);
* pooled distinct-2 of the samples (unique word bigrams / all bigrams), as a ratio to the
  reference's own distinct-2 on the same prompts and seed (measured once at the start).

:func:`budget_breach` is the pure decision; :class:`DriftProbe` takes the measurements. The
recipe keeps the weights of the last probe that was within budget and, on a breach, restores
them and ends training (see :meth:`alignment.recipes.dpo.DPORecipe.stop_early`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignment.generation import GenerationResult, generate, response_logps
from alignment.text_stats import distinct_n


@dataclass(frozen=True)
class ProbeReading:
    """One probe of the policy: the step it was taken after, KL to the reference (nats per
    sequence) and distinct-2 of its samples and of the reference's."""

    step: int
    kl: float
    distinct2: float
    reference_distinct2: float

    @property
    def distinct2_ratio(self) -> float:
        """distinct-2 as a share of the reference's (1.0 when the reference has no bigrams)."""
        return self.distinct2 / self.reference_distinct2 if self.reference_distinct2 > 0 else 1.0


def budget_breach(reading: ProbeReading, max_kl: float | None, min_distinct2_ratio: float | None) -> str | None:
    """The first budget ``reading`` breaks, as a sentence, or None when it is within both.

    Breached when ``kl > max_kl`` or ``distinct2_ratio < min_distinct2_ratio``; a None limit is
    not checked.
    """
    if max_kl is not None and reading.kl > max_kl:
        return f"KL {reading.kl:.2f} nats past the budget of {max_kl:g} at step {reading.step}"
    if min_distinct2_ratio is not None and reading.distinct2_ratio < min_distinct2_ratio:
        return (f"distinct-2 {reading.distinct2:.3f} is {reading.distinct2_ratio:.0%} of the reference's "
                f"{reading.reference_distinct2:.3f}, under the floor of {min_distinct2_ratio:.0%} at step {reading.step}")
    return None


class DriftProbe:
    """Samples a model on fixed prompts and measures KL to ``reference`` and distinct-2.

    ``reference`` is a frozen causal LM with the policy's tokenizer; ``generation`` the
    sampling settings (:class:`alignment.config.GenerationSettings`); ``seed`` fixes the draw,
    so successive readings differ only through the policy.
    """

    def __init__(self, reference, tokenizer, prompts: Sequence, generation, seed: int,
                 max_prompt_length: int | None = None) -> None:
        if not prompts:
            raise ValueError("the drift probe needs at least one prompt")
        self.reference, self.tokenizer, self.prompts = reference.eval(), tokenizer, list(prompts)
        self.generation, self.seed, self.max_prompt_length = generation, seed, max_prompt_length
        self.temperature = generation.temperature if generation.do_sample else 1.0
        ref_gen = self._sample(self.reference)
        self.reference_distinct2 = distinct_n(ref_gen.texts, 2)

    def _sample(self, model) -> GenerationResult:
        return generate(model, self.tokenizer, self.prompts, self.generation, self.seed,
                        max_prompt_length=self.max_prompt_length)

    @torch.no_grad()
    def read(self, policy, step: int) -> ProbeReading:
        """Sample ``policy`` (its train/eval mode is restored) and measure it against the reference."""
        was_training = policy.training
        policy.eval()
        try:
            gen = self._sample(policy)
            kl = (response_logps(policy, gen, self.temperature)
                  - response_logps(self.reference, gen, self.temperature)).mean()
        finally:
            policy.train(was_training)
        return ProbeReading(step, float(kl), distinct_n(gen.texts, 2), self.reference_distinct2)
