"""The evaluation suite: candidate, champion and reference on held-out prompts and pairs.

:func:`evaluate_models` samples every model on the same prompts with the same seed
(:func:`alignment.generation.generate`), scores the samples with the reward model and the
oracle, and computes the statistics of :mod:`tasks.evaluation.metrics`; with
``settings.greedy`` it also decodes each prompt greedily per model and counts the responses
that loop. It returns the
:class:`~tasks.evaluation.report.EvalReport` and a samples table; logging is the caller's job.

Assumptions: the three policies share the reference's tokenizer (checked: KL compares
token-level probabilities); a policy folder is an ordinary Hugging Face folder, or a LoRA
adapter folder (its ``merged/`` full weights when present, else the adapter merged into its
base). At most two policies are in memory at once (the reference and one other).
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from alignment import generation
from alignment.batching import (
    Truncation,
    collate_pairs,
    decode_prompt,
    to_device,
    tokenize_pairs,
)
from alignment.config import ModelSettings
from alignment.generation import GenerationResult, generate
from alignment.models import (
    CausalLMLogps,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    score_responses,
)
from tasks.evaluation import metrics as M
from tasks.evaluation import sample_cache as sample_cache_io
from tasks.evaluation.model_judge import ModelJudge, judge_accuracy
from tasks.evaluation.report import AccuracyResult, EvalReport, JudgeAgreement, ModelEval
from tasks.evaluation.settings import EvalSettings

Prompt = str | list[dict]
Oracle = Callable[[list[str]], Sequence[float]]
"""Scores responses (text only), higher is better; e.g. the demo's VADER compound."""
RewardScorer = Callable[[list[Prompt], list[str]], np.ndarray]
"""Scores (prompt, response) pairs with a reward model."""


class EvalOutput(NamedTuple):
    report: EvalReport
    samples: list[dict[str, Any]]
    """One row per sample (first ``settings.samples_table_rows``): prompt, the three responses, scores."""
    scores: dict[str, dict[str, list[float]]]
    """Every sample's score by judge ("reward model", "oracle") and role: the input of
    :func:`tasks.evaluation.plots.plot_score_distributions`."""


@dataclass
class _Samples:
    gen: GenerationResult
    logps: np.ndarray
    """Σ_t log π(y_t) of each response under the model that sampled it (sampling temperature)."""
    ref_logps: np.ndarray
    """The same under the reference."""
    rewards: np.ndarray | None = None
    oracle: np.ndarray | None = None
    fluency_logps: np.ndarray | None = None
    """Σ_t log π_ref(y_t) at temperature 1: the reference's plain likelihood of the text (fluency proxy)."""
    greedy: list[str] | None = None
    """The model's greedy response to each evaluated prompt (one per prompt; ``settings.greedy``)."""


def load_policy(path: str | Path, device: str = "cpu", tokenizer: str | None = None, chat_template: str | None = None):
    """``(model, tokenizer)``, frozen in eval mode; a LoRA folder loads its ``merged/`` weights
    when present (else transformers loads the adapter onto its recorded base). ``tokenizer``: a
    tokenizer id or folder apart from the model's (``model.policy.tokenizer``); ``chat_template``:
    ``model.policy.chat_template``. The tokenizer is None when there is none to load."""
    path = Path(path)
    if (path / "adapter_config.json").exists() and (path / "merged").is_dir():
        path = path / "merged"
    settings = ModelSettings(name_or_path=str(path), tokenizer=tokenizer, chat_template=chat_template)
    model = load_causal_lm(settings, trainable=False)
    try:
        tokenizer = load_tokenizer(settings)
    except (OSError, ValueError):
        tokenizer = None
    return model.to(device), tokenizer


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def response_logps(model, gen: GenerationResult, temperature: float, batch_size: int) -> np.ndarray:
    """:func:`alignment.generation.response_logps` as a NumPy array (the report's arithmetic)."""
    return generation.response_logps(model, gen, temperature, batch_size).numpy()


def reference_logps(ref, gen: GenerationResult, temperature: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The responses' log-probs under the reference at the sampling temperature and at 1 (the
    fluency figure's), from one forward pass (:func:`alignment.generation.response_logps_at`)."""
    if temperature == 1.0:
        at = generation.response_logps(ref, gen, 1.0, batch_size).numpy()
        return at, at
    at, plain = generation.response_logps_at(ref, gen, (temperature, 1.0), batch_size)
    return at.numpy(), plain.numpy()


@torch.no_grad()
def pair_logps(model, tokenizer, pairs: list[Mapping], settings: EvalSettings) -> tuple[np.ndarray, ...]:
    """``(chosen_logps, rejected_logps, chosen_tokens)`` of held-out pairs under ``model``
    (temperature 1), tokenised and scored as the DPO recipe does
    (:func:`alignment.batching.tokenize_pairs` with EOS appended, :class:`alignment.models.CausalLMLogps`)."""
    trunc = Truncation(settings.max_length, settings.max_prompt_length, bos_token_id=tokenizer.bos_token_id)
    examples, _ = tokenize_pairs(tokenizer, pairs, trunc, source="held-out pairs")
    scorer = CausalLMLogps(model)
    device = next(model.parameters()).device
    chosen, rejected, tokens = [], [], []
    for s in range(0, len(examples), settings.score_batch_size):
        batch = collate_pairs(examples[s : s + settings.score_batch_size], pad_id=_pad_id(tokenizer))
        out = scorer(to_device(batch, device))
        half = batch["num_sequences"] // 2  # chosen sequences first, then rejected
        chosen.append(out["seq_logps"][:half].cpu())
        rejected.append(out["seq_logps"][half:].cpu())
        tokens.append(out["seq_tokens"][:half].cpu())
    return tuple(torch.cat(x).double().numpy() for x in (chosen, rejected, tokens))


def reward_scorer_from_folder(path: str | Path, device: str = "cpu", batch_size: int = 32,
                              max_length: int = 512, max_prompt_length: int = 256) -> RewardScorer:
    """A scorer for a reward-model folder (one-label sequence classification), tokenising as the
    reward recipe trains (:func:`alignment.models.score_responses`)."""
    settings = ModelSettings(name_or_path=str(path))
    tokenizer = load_tokenizer(settings)
    model = load_reward_model(settings, tokenizer, trainable=False).to(device)

    def score(prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        return np.asarray(score_responses(model, tokenizer, prompts, responses, batch_size,
                                          max_length=max_length, max_prompt_length=max_prompt_length))

    return score


def _model_eval(role: str, path: str, s: _Samples, kl: M.KLEstimate | None, max_new_tokens: int,
                ppl: float | None, loop_threshold: float, evaluated: int, distinct_window: int | None = None) -> ModelEval:
    """``evaluated``: how many of the greedy responses answer the evaluated prompts (the first ones);
    ``distinct_window``: distinct-n over blocks of that many responses (:func:`M.windowed_distinct_n`)."""
    texts = s.gen.texts
    loops = M.loop_stats(s.greedy, 3, loop_threshold) if s.greedy else None
    loops_evaluated = M.loop_stats(s.greedy[:evaluated], 3, loop_threshold) if s.greedy else None
    reasons = Counter(r for t in texts for r in M.malformed_reasons(t))
    def mean_std(x):
        return (None, None) if x is None else (float(np.mean(x)), float(np.std(x)))
    reward_mean, reward_std = mean_std(s.rewards)
    oracle_mean, oracle_std = mean_std(s.oracle)
    return ModelEval(
        role=role, path=path, reward_mean=reward_mean, reward_std=reward_std, oracle_mean=oracle_mean,
        oracle_std=oracle_std, kl=None if kl is None else kl.mean, kl_se=None if kl is None else kl.se,
        length={**M.length_stats(s.gen.response_lengths.numpy(), max_new_tokens),
                "empty_share": float(np.mean(_empty(texts))) if len(texts) else 0.0},
        distinct_1=M.windowed_distinct_n(texts, 1, distinct_window),
        distinct_2=M.windowed_distinct_n(texts, 2, distinct_window),
        repetition_rate=M.repetition_rate(texts), repeated_trigram_rate=M.repetition_rate(texts, 3),
        fluency=_fluency(s), malformed_share=M.malformed_share(texts),
        malformed_reasons=dict(reasons), perplexity=ppl, eos_share=float(s.gen.hit_eos.float().mean()),
        greedy_looping_share=None if loops is None else loops.looping_share,
        greedy_seq_rep3=None if loops is None else loops.mean_seq_rep,
        greedy_looping_share_evaluated=None if loops_evaluated is None else loops_evaluated.looping_share,
    )


def _fluency(s: _Samples) -> float | None:
    """Per-token log-likelihood of the responses under the reference; None when all are empty."""
    if s.fluency_logps is None:
        return None
    lengths = s.gen.response_lengths.numpy()
    return M.token_loglik(s.fluency_logps, lengths) if lengths.sum() > 0 else None


def _release_accelerator_memory() -> None:
    """Return freed GPU memory to the driver (CPU memory is freed when the last reference goes;
    a full gc.collect costs about half a second, so it runs only where memory is scarce)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def evaluate_models(
    candidate: str | Path,
    champion: str | Path | None,
    reference: str | Path,
    prompts: Sequence[Prompt],
    pairs: Sequence[Mapping[str, Any]] | Any | None = None,
    *,
    reward_model: str | Path | None = None,
    reward_scorer: RewardScorer | None = None,
    oracle: Oracle | None = None,
    settings: EvalSettings | None = None,
    beta: float = 0.1,
    device: str = "cpu",
    reference_tokenizer: str | None = None,
    greedy_prompts: Sequence[Prompt] | None = None,
    sample_cache: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    chat_template: str | None = None,
) -> EvalOutput:
    """Evaluate ``candidate`` against ``champion`` (None: the reference stands in) and ``reference``.

    ``prompts``: held-out prompts (strings or chat message lists), the first
    ``settings.num_prompts`` used, each sampled ``samples_per_prompt`` times per model with
    ``settings.seed``. ``pairs``: held-out preference rows or a DataFrame (``prompt``,
    ``is_chat``, ``chosen``, ``rejected``; the first ``settings.max_pairs``) for preference
    accuracy (reward model; implicit DPO reward β·(log π − log π_ref) of candidate and
    champion) and the perplexity of the chosen responses. ``reward_scorer`` wins over
    ``reward_model`` (a folder). ``reference_tokenizer``: the tokenizer of every policy when it
    lives apart from the reference model's folder (``model.policy.tokenizer``; the trained
    policies save it in theirs), and ``chat_template`` its chat template (``model.policy.chat_template``). KL is computed at the sampling temperature. ``greedy_prompts``:
    more held-out prompts to decode greedily beside the evaluated ones (``settings.greedy``;
    duplicates of an evaluated prompt dropped), for the looping share only. ``sample_cache``: a
    folder where each model's samples, their log-probs and greedy responses are kept and read back
    by later evaluations with the same reference, prompts and settings (a round's champion and
    the reference; :mod:`tasks.evaluation.sample_cache`); None computes everything. ``progress``: called
    with a line as each model's samples, log-probs and greedy responses and each judge's scores are
    done, with their time (the stage logs them). Raises ValueError
    for no prompts, a bad pair row (naming it) or tokenizers that differ from the reference's.
    """
    settings = settings or EvalSettings()
    start = time.perf_counter()
    prompts = list(prompts)[: settings.num_prompts]
    if not prompts:
        raise ValueError("evaluate_models needs at least one held-out prompt")
    if hasattr(pairs, "to_dict"):
        pairs = pairs.to_dict("records")
    pairs = [dict(p) for p in (pairs if pairs is not None else [])][: settings.max_pairs]
    k = settings.samples_per_prompt
    sample_prompts = [p for p in prompts for _ in range(k)]
    groups = [i for i in range(len(prompts)) for _ in range(k)]
    gen_cfg = settings.generation
    temperature = gen_cfg.temperature if gen_cfg.do_sample else 1.0

    greedy_set = _greedy_set(prompts, greedy_prompts) if settings.greedy else None
    clock = _Clock(progress)
    samples, pair_lp = _sample_policies(candidate, champion, reference, sample_prompts, pairs, settings,
                                        temperature, device, reference_tokenizer, greedy_prompts=greedy_set,
                                        sample_cache=Path(sample_cache) if sample_cache is not None else None,
                                        clock=clock, chat_template=chat_template)
    scorer = reward_scorer
    if scorer is None and reward_model is not None:
        scorer = reward_scorer_from_folder(reward_model, device, settings.score_batch_size,
                                           settings.max_length, settings.max_prompt_length)
    judge = ModelJudge(settings.judge_model, device) if settings.judge_model is not None else None
    scored = {id(v): v for v in samples.values()}.values()  # the champion may be the reference
    for s in scored:
        if scorer is not None:
            s.rewards = np.asarray(scorer(sample_prompts, s.gen.texts), dtype=np.float64)
        if oracle is not None:
            s.oracle = np.asarray(oracle(s.gen.texts), dtype=np.float64)
    clock.lap(f"{len(scored) * len(sample_prompts)} responses scored by "
              + (" and ".join(j for j, on in (("the reward model", scorer), ("the oracle", oracle)) if on) or "no judge"))

    evals = {}
    for role, path in (("candidate", candidate), ("champion", champion or reference), ("reference", reference)):
        smp = samples[role]
        ppl = None
        if role in pair_lp and pair_lp[role][2].sum() > 0:
            ppl = M.perplexity(-pair_lp[role][0], pair_lp[role][2])
        kl = M.sequence_kl(smp.logps, smp.ref_logps, groups=groups)
        evals[role] = _model_eval(role, str(path), smp, kl, gen_cfg.max_new_tokens, ppl, settings.loop_threshold,
                                  len(prompts), settings.distinct_window)
    report = EvalReport(
        candidate=evals["candidate"], champion=evals["champion"], reference=evals["reference"],
        champion_is_reference=champion is None,
        win_rates=_win_rates(samples, settings, groups) + _model_win_rates(judge, sample_prompts, samples, settings,
                                                                          groups),
        judge_agreement=_judge_agreement(samples, settings),
        preference_accuracy=_accuracies(pairs, pair_lp, scorer, beta, champion is not None, settings.confidence)
        + ([_accuracy("model", None, v, 1.0 - v, settings.confidence) for v in [judge_accuracy(judge, pairs)]]
           if judge is not None and pairs else []),
        length_drift=M.length_drift(samples["candidate"].gen.response_lengths.numpy(),
                                    samples["reference"].gen.response_lengths.numpy()),
        num_prompts=len(prompts), samples_per_prompt=k, num_pairs=len(pairs), seed=settings.seed,
        generation=gen_cfg.model_dump(), kl_temperature=temperature, beta=beta,
        loop_threshold=settings.loop_threshold if settings.greedy else None,
        num_greedy_prompts=len(greedy_set) if greedy_set else None,
        greedy_loop_rise_se=_greedy_rise_se(samples, settings.loop_threshold),
        wall_time_s=time.perf_counter() - start,
    )
    clock.lap("win rates, intervals and guard figures")
    shown = ("candidate", "champion", "reference") if champion is not None else ("candidate", "reference")
    scores = {judge: {role: getattr(samples[role], attr).tolist() for role in shown}
              for judge, attr in (("reward model", "rewards"), ("oracle", "oracle"))
              if getattr(samples["candidate"], attr) is not None}
    return EvalOutput(report, _samples_table(sample_prompts, groups, samples, settings.samples_table_rows), scores)


def _greedy_set(prompts: list[Prompt], extra: Sequence[Prompt] | None) -> list[Prompt]:
    """The evaluated prompts, then each extra prompt not among them (in order, once)."""
    out, seen = list(prompts), {json.dumps(p, sort_keys=True) for p in prompts}
    for p in extra or []:
        if (key := json.dumps(p, sort_keys=True)) not in seen:
            seen.add(key)
            out.append(p)
    return out


def _greedy_rise_se(samples: dict[str, _Samples], threshold: float) -> float | None:
    """Standard error of the candidate's greedy looping share minus the reference's, paired per prompt."""
    cand, ref = samples["candidate"].greedy, samples["reference"].greedy
    if not cand or not ref:
        return None
    se = M.paired_share_diff_se(M.looping(cand, 3, threshold), M.looping(ref, 3, threshold))
    return se if np.isfinite(se) else None


def _sample_policies(candidate, champion, reference, sample_prompts: list[Prompt], pairs: list[dict],
                     settings: EvalSettings, temperature: float, device: str, reference_tokenizer: str | None,
                     greedy_prompts: list[Prompt] | None = None, sample_cache: Path | None = None,
                     clock: _Clock | None = None, chat_template: str | None = None):
    """Sample each policy with the same seed; log-probs of its samples under itself and the
    reference; its log-probs of the held-out pairs; its greedy responses to ``greedy_prompts``
    (None: none). Holds the reference and one other model. With ``sample_cache`` (a folder, see
    :mod:`tasks.evaluation.sample_cache`) a model whose samples were kept by an earlier evaluation
    with the same reference, prompts and settings is read back instead of sampled again (it is
    loaded only for the held-out pairs' log-probs), and every model's samples are kept. ``clock``
    reports each model's work as it is done."""
    clock = clock or _Clock(None)
    def sample(model, tokenizer) -> GenerationResult:
        return generate(model, tokenizer, sample_prompts, settings.generation, settings.seed,
                        max_prompt_length=settings.max_prompt_length)

    greedy_cfg = settings.generation.model_copy(update={"do_sample": False})

    def greedy(model, tokenizer) -> list[str] | None:
        if not greedy_prompts:
            return None
        return generate(model, tokenizer, greedy_prompts, greedy_cfg, settings.seed,
                        max_prompt_length=settings.max_prompt_length).texts

    shaping = {"generation": settings.generation.model_dump(mode="json"), "seed": settings.seed,
               "max_prompt_length": settings.max_prompt_length, "score_batch_size": settings.score_batch_size,
               "temperature": temperature}

    def kept(path) -> tuple[str | None, dict | None]:
        if sample_cache is None:
            return None, None
        key = sample_cache_io.sample_key(path, reference, prompts=sample_prompts, greedy_prompts=greedy_prompts,
                                         settings=shaping, device=device, reference_tokenizer=reference_tokenizer,
                                         chat_template=chat_template, memo_dir=sample_cache)
        return key, (sample_cache_io.load(sample_cache, key) if key else None)

    def keep(key: str | None, s: _Samples) -> None:
        if key is not None:  # None: no cache, or a model that is not a local folder
            sample_cache_io.save(sample_cache, key, s.gen, s.logps, s.ref_logps, s.fluency_logps, s.greedy)

    def read_back(found: dict) -> _Samples:
        return _Samples(found["gen"], found["logps"], found["ref_logps"], fluency_logps=found["fluency_logps"],
                        greedy=found["greedy"])

    ref_model, tokenizer = load_policy(reference, device, reference_tokenizer, chat_template)
    if tokenizer is None:
        raise ValueError(f"reference folder {reference} has no tokenizer")
    vocab = tokenizer.get_vocab()

    key, found = kept(reference)
    if found is not None:
        samples = {"reference": read_back(found)}
    else:
        ref_gen = sample(ref_model, tokenizer)
        ref_lp, plain = reference_logps(ref_model, ref_gen, temperature, settings.score_batch_size)
        samples = {"reference": _Samples(ref_gen, ref_lp, ref_lp, fluency_logps=plain,
                                         greedy=greedy(ref_model, tokenizer))}
        keep(key, samples["reference"])
    pair_lp: dict[str, tuple[np.ndarray, ...]] = {}
    if pairs:
        pair_lp["reference"] = pair_logps(ref_model, tokenizer, pairs, settings)
    clock.lap(_work_line("reference", found is not None, samples["reference"], len(pairs)))
    for role, path in [("candidate", candidate)] + ([("champion", champion)] if champion is not None else []):
        key, found = kept(path)
        if found is not None:
            samples[role] = read_back(found)
        if found is None or pairs:
            model, own_tok = load_policy(path, device)
            if own_tok is not None and own_tok.get_vocab() != vocab:
                raise ValueError(f"{role} at {path} has a different tokenizer from the reference; KL needs the same one")
            if found is None:
                gen = sample(model, tokenizer)
                under_ref, plain = reference_logps(ref_model, gen, temperature, settings.score_batch_size)
                samples[role] = _Samples(gen, response_logps(model, gen, temperature, settings.score_batch_size),
                                         under_ref, fluency_logps=plain, greedy=greedy(model, tokenizer))
                keep(key, samples[role])
            if pairs:
                pair_lp[role] = pair_logps(model, tokenizer, pairs, settings)
            del model
            _release_accelerator_memory()
        clock.lap(_work_line(role, found is not None, samples[role], len(pairs)))
    if champion is None:
        samples["champion"] = samples["reference"]
        if pairs:
            pair_lp["champion"] = pair_lp["reference"]
    del ref_model
    _release_accelerator_memory()
    return samples, pair_lp


def _work_line(role: str, cached: bool, s: _Samples, pairs: int) -> str:
    """``candidate: 2092 responses sampled and scored, 2092 greedy; 65 held-out pairs scored``."""
    what = ("samples, log-probs and greedy responses read from the sample cache" if cached else
            f"{len(s.gen)} responses sampled and scored" + (f", {len(s.greedy)} greedy" if s.greedy else ""))
    return f"{role}: {what}" + (f"; {pairs} held-out pairs scored" if pairs else "")


class _Clock:
    """Reports a line with the seconds since the previous one (no-op without a callback)."""

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self.report, self.last = report, time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        if self.report is not None:
            self.report(f"{what} in {now - self.last:.1f} s")
        self.last = now


def _empty(texts: Sequence[str]) -> np.ndarray:
    """True for each response with no visible text (nothing generated, or only whitespace)."""
    return np.array([not t.strip() for t in texts], dtype=bool)


def _win_rates(samples: dict[str, _Samples], settings: EvalSettings, groups: list[int]) -> list[M.WinRate]:
    """Win rates of the candidate by each judge. Empty responses are no answer, whatever a judge
    scores them: one empty against a non-empty response loses, and two empty responses are not a
    comparison (left out, so they are not ties that pull the rate to one half and narrow nothing)."""
    out = []
    for judge, attr in (("reward_model", "rewards"), ("oracle", "oracle")):
        if settings.judge not in ("both", judge) or getattr(samples["candidate"], attr) is None:
            continue
        for opponent in ("champion", "reference"):
            a = np.array(getattr(samples["candidate"], attr), dtype=np.float64)
            b = np.array(getattr(samples[opponent], attr), dtype=np.float64)
            empty_a, empty_b = _empty(samples["candidate"].gen.texts), _empty(samples[opponent].gen.texts)
            floor = min(a.min(), b.min()) - settings.tie_margin - 1.0  # below any real score: a sure loss
            a[empty_a & ~empty_b], b[empty_b & ~empty_a] = floor, floor
            keep = ~(empty_a & empty_b)
            if not keep.any():
                continue  # nothing to compare: the gate then says no win rate was measured
            w = M.win_rate(a[keep], b[keep], tie_margin=settings.tie_margin, confidence=settings.confidence,
                           groups=[g for g, k in zip(groups, keep, strict=True) if k])
            out.append(w.model_copy(update={"judge": judge, "opponent": opponent}))
    return out


def _model_win_rates(judge: ModelJudge | None, prompts: list[Prompt], samples: dict[str, _Samples],
                     settings: EvalSettings, groups: list[int]) -> list[M.WinRate]:
    """Win rates of the candidate by the judge model (both orders per comparison; empty responses
    as in :func:`_win_rates`)."""
    if judge is None:
        return []
    out = []
    cand = samples["candidate"]
    for opponent in ("champion", "reference"):
        other = samples[opponent]
        outcome = judge.verdicts(prompts, cand.gen.texts, other.gen.texts)
        empty_a, empty_b = _empty(cand.gen.texts), _empty(other.gen.texts)
        outcome[empty_a & ~empty_b], outcome[empty_b & ~empty_a] = 0.0, 1.0
        keep = ~(empty_a & empty_b)
        if not keep.any():
            continue
        w = M.win_rate(outcome[keep], 1.0 - outcome[keep], confidence=settings.confidence,
                       groups=[g for g, k in zip(groups, keep, strict=True) if k])
        out.append(w.model_copy(update={"judge": "model", "opponent": opponent}))
    return out


def _judge_agreement(samples: dict[str, _Samples], settings: EvalSettings) -> list[JudgeAgreement]:
    """How often the reward model orders candidate-vs-opponent responses as the oracle does
    (both judges needed; pairs where both responses are empty are no comparison)."""
    out = []
    cand = samples["candidate"]
    if cand.rewards is None or cand.oracle is None:
        return out
    for opponent in ("champion", "reference"):
        other = samples[opponent]
        keep = ~(_empty(cand.gen.texts) & _empty(other.gen.texts))
        if not keep.any():
            continue
        a = M.judge_agreement(cand.rewards[keep], other.rewards[keep], cand.oracle[keep], other.oracle[keep],
                              tie_margin=settings.tie_margin, confidence=settings.confidence)
        if a is not None:
            out.append(JudgeAgreement(opponent=opponent, rate=a.rate, lower=a.lower, upper=a.upper, n=a.n,
                                      oracle_ties=a.oracle_ties))
    return out


def _accuracies(pairs: list[dict], pair_lp: dict, scorer: RewardScorer | None, beta: float, has_champion: bool,
                confidence: float) -> list[AccuracyResult]:
    out = []
    if pairs and scorer is not None:
        prompts = [decode_prompt(p) for p in pairs]
        rc = np.asarray(scorer(prompts, [p["chosen"] for p in pairs]), dtype=np.float64)
        rr = np.asarray(scorer(prompts, [p["rejected"] for p in pairs]), dtype=np.float64)
        out.append(_accuracy("reward_model", None, rc, rr, confidence))
    if pairs:
        ref_c, ref_r, _ = pair_lp["reference"]
        for role in ("candidate", "champion") if has_champion else ("candidate",):
            c, r, _ = pair_lp[role]
            out.append(_accuracy("implicit_dpo", role, beta * (c - ref_c), beta * (r - ref_r), confidence))
    return out


def _accuracy(judge: str, model: str | None, chosen: np.ndarray, rejected: np.ndarray, confidence: float):
    acc = M.preference_accuracy(chosen, rejected, confidence)
    return AccuracyResult(judge=judge, model=model, accuracy=acc.accuracy, lower=acc.lower, upper=acc.upper,
                          mean_margin=acc.mean_margin, ece=M.calibration_ece(chosen, rejected), n=acc.n)


def _samples_table(prompts: list[Prompt], groups: list[int], samples: dict[str, _Samples],
                   rows: int) -> list[dict[str, Any]]:
    """The first ``rows`` samples: prompt, each role's sampled response and scores, and each
    role's greedy response to that prompt (``{role}_greedy``, where greedy decoding ran)."""
    table = []
    for i in range(min(rows, len(prompts))):
        p = prompts[i]
        row: dict[str, Any] = {"prompt": p if isinstance(p, str) else json.dumps(p)}
        for role in ("candidate", "champion", "reference"):
            s = samples[role]
            row[role] = s.gen.texts[i]
            if s.rewards is not None:
                row[f"{role}_reward"] = float(s.rewards[i])
            if s.oracle is not None:
                row[f"{role}_oracle"] = float(s.oracle[i])
            if s.greedy is not None:
                row[f"{role}_greedy"] = s.greedy[groups[i]]
        cand = samples["candidate"]
        row["candidate_log_ratio"] = float(cand.logps[i] - cand.ref_logps[i])
        row["candidate_malformed"] = ",".join(M.malformed_reasons(cand.gen.texts[i]))
        table.append(row)
    return table
