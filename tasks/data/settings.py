"""Typed settings of the data layer: the ``data:`` (ingest + validation) and ``preferences:``
(dataset building) sections of the pipeline YAML.

Every field has a docstring; unknown keys are errors (see :class:`alignment.config.StrictModel`).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from alignment.config import StrictModel

Kind = Literal["pairwise", "ranking", "rating", "binary", "demonstration"]
KINDS: tuple[str, ...] = get_args(Kind)
PREFERENCE_KINDS: tuple[str, ...] = ("pairwise", "ranking", "rating", "binary")
Layout = Literal["auto", "native", "chosen_rejected", "ultrafeedback", "messages", "unpaired", "prompt_completion"]
Format = Literal["auto", "jsonl", "csv", "parquet", "dataset", "hub"]


class SourceSettings(StrictModel):
    """One explicit feedback source. Like landing files, its content is ingested once (tracked by
    digest; hub datasets by id, config, split and revision)."""

    path: str
    """A file (.jsonl/.json/.csv/.tsv/.parquet), a folder of such files, the folder of a
    ``datasets`` dataset saved with ``save_to_disk``, or (format ``hub``) a hub dataset id."""
    format: Format = "auto"
    """File format; ``auto`` goes by extension (a folder with ``dataset_info.json`` or
    ``dataset_dict.json`` is a saved dataset; a non-existing ``owner/name`` path is a hub id)."""
    kind: Kind | None = None
    """Feedback kind of every row; None detects it from the columns (or a per-row ``kind`` column)."""
    layout: Layout = "auto"
    """Public layout to convert from: ``native`` (alignflow's fields), ``chosen_rejected``
    (prompt/chosen/rejected as strings or chat lists, including HH-RLHF full conversations),
    ``ultrafeedback`` (instruction + completions with ratings), ``messages`` (OpenAI ``messages`` or
    ShareGPT ``conversations`` chat lists: demonstrations), ``unpaired`` (TRL prompt/completion/label:
    thumbs), ``prompt_completion`` (TRL prompt/completion: demonstrations); ``auto`` detects it."""
    columns: dict[str, str] = {}
    """Renames applied first, source column -> alignflow field (e.g. {"question": "prompt"})."""
    split: str = "train"
    """Split of a hub dataset or of a saved ``DatasetDict``."""
    config_name: str | None = None
    """Hub dataset configuration name."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit)."""
    score_field: str = "fine-grained_score"
    """UltraFeedback layout: completion key holding the score; when a completion lacks it, the
    mean of its numeric ``annotations.*.Rating`` values is used. Must match ``rating_scale``."""


class IngestSettings(StrictModel):
    """Where feedback comes from and how strictly it is validated (the ``data:`` section)."""

    landing_dir: str | None = None
    """Folder where exports land. Each file (or saved-dataset folder) is ingested once, tracked
    by content digest in the ledger; a changed file counts as new. None: no landing folder."""
    ledger_path: str | None = None
    """JSON-lines ledger of content digests and their state (pending, consumed, failed); None:
    ``ledger.jsonl`` in the pipeline's own data folder, so pipelines reading one landing folder
    each consume it for themselves."""
    landing_patterns: list[str] = ["*.jsonl", "*.json", "*.csv", "*.tsv", "*.parquet"]
    """Glob patterns of landing files (searched recursively); saved-dataset folders are always taken."""
    landing_quiet_s: float = Field(60.0, ge=0)
    """A landing file changed less than this many seconds ago is left for a later run unless it
    looks complete (text ending with a newline, JSON with its closing bracket, Parquet with its
    footer). Names starting with ``.`` or ending in ``.tmp``/``.part`` are never read: write
    under such a name, then rename (atomic)."""
    landing_kind: Kind | None = None
    """Kind of every landing file; None detects it per file from the columns."""
    landing_layout: Layout = "auto"
    """Public layout of landing files (see ``SourceSettings.layout``)."""
    sources: list[SourceSettings] = []
    """Explicit sources read on every ingest, in addition to new landing files."""
    kinds: list[Kind] = list(KINDS)
    """Kinds accepted; rows of other kinds are quarantined (reason ``kind_not_allowed``)."""
    quarantine_max_share: float = Field(0.05, ge=0, le=1)
    """Largest share of quarantined rows in one ingest batch; above it the ingest fails with
    :class:`~tasks.data.validate.QuarantineThresholdExceeded` after writing the quarantine."""
    rating_scale: tuple[float, float] = (1.0, 5.0)
    """Inclusive (min, max) of ``score`` in rating rows; scores outside are quarantined."""
    max_text_chars: int = Field(20000, gt=0)
    """Longest prompt or response in characters (chat prompts: their stored JSON text)."""
    chat_roles: list[str] = ["system", "user", "assistant", "tool"]
    """Roles allowed in chat-message prompts."""
    timestamp_format: str | None = None
    """strftime format of ``created_at`` strings; None: ISO 8601. Times without a zone are UTC."""
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"
    """Unit of numeric ``created_at`` values (epoch time)."""
    require_timestamp: bool = False
    """Quarantine rows without ``created_at`` (reason ``missing:created_at``)."""
    duplicates: Literal["quarantine", "keep"] = "quarantine"
    """Rows identical in every field to an earlier row of the same batch: quarantined (reason
    ``duplicate_row``; the first copy stays valid) or kept."""

    @model_validator(mode="after")
    def _check(self) -> IngestSettings:
        lo, hi = self.rating_scale
        if not lo < hi:
            raise ValueError(f"rating_scale must be (min, max) with min < max, got {self.rating_scale}")
        if not self.kinds:
            raise ValueError("kinds must list at least one kind")
        return self


class SplitFractions(StrictModel):
    """Shares of prompts in each split (they must sum to 1)."""

    train: float = Field(0.8, ge=0, le=1)
    """Training share."""
    validation: float = Field(0.1, ge=0, le=1)
    """Validation share (reward-model and DPO held-out metrics)."""
    test: float = Field(0.1, ge=0, le=1)
    """Test share (final evaluation only)."""

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions must sum to 1, got {total}")
        return self


class PreferenceSettings(StrictModel):
    """How validated feedback becomes the canonical preference dataset (the ``preferences:`` section)."""

    dedup_rows: bool = True
    """Count rows identical after whitespace normalisation (same texts, label, annotator and
    timestamp: the same export ingested twice) once. Turn off for anonymous feedback without
    timestamps, where identical rows are separate votes."""
    ties: Literal["drop", "keep"] = "drop"
    """Pairs whose vote ends in a tie: dropped, or kept as both orders at half weight each
    (the Bradley–Terry loss of a 0.5 soft label)."""
    rating_min_gap: float = Field(1.0, gt=0)
    """Ratings -> pairs: two responses to a prompt form a pair when their mean scores differ by
    at least this much (the higher one is chosen)."""
    binary_pairing: Literal["all", "balanced"] = "all"
    """Thumbs -> pairs within a prompt: every up response with every down response (``all``),
    or one-to-one in hash order (``balanced``: min(#up, #down) pairs)."""
    max_pairs_per_prompt: int | None = Field(None, gt=0)
    """Cap on rating- and binary-derived pairs per prompt (kept in hash order, deterministic)."""
    unpaired_sources: list[Literal["binary", "rating", "comparisons"]] = ["binary", "rating", "comparisons"]
    """What feeds the unpaired (KTO) set ``unpaired.parquet``: thumbs (each vote), ratings (a
    response's mean score against ``rating_desirable_min``/``rating_undesirable_max``) and
    comparisons (the chosen side of a pair votes desirable, the rejected side undesirable)."""
    rating_desirable_min: float = 4.0
    """Unpaired set: a response whose weighted mean rating is at least this is desirable (default for a 1-5 scale)."""
    rating_undesirable_max: float = 2.0
    """Unpaired set: a response whose weighted mean rating is at most this is undesirable; between the
    two thresholds a rating says nothing about it."""
    min_agreement: float = Field(0.6, ge=0, le=1)
    """Pairs whose vote agreement (majority share) is below this are handled by ``low_agreement``."""
    low_agreement: Literal["drop", "downweight"] = "downweight"
    """What happens to low-agreement pairs."""
    low_agreement_weight: float = Field(0.5, gt=0, le=1)
    """Weight multiplier of low-agreement pairs when ``low_agreement`` is ``downweight``."""
    annotator_min_agreement: float = Field(0.6, ge=0, le=1)
    """Annotators whose agreement with the leave-one-out majority of the others is below this
    (random answering gives about 0.5) are flagged."""
    annotator_min_items: int = Field(20, gt=0)
    """Items an annotator must share with others before they can be flagged."""
    annotator_action: Literal["flag", "downweight", "exclude"] = "downweight"
    """What happens to flagged annotators' votes: reported only, down-weighted, or removed."""
    annotator_downweight: float = Field(0.25, gt=0, le=1)
    """Vote weight multiplier of flagged annotators when ``annotator_action`` is ``downweight``."""
    splits: SplitFractions = SplitFractions()
    """Prompt-level split fractions."""
    split_salt: str = "alignflow"
    """Salt of the prompt hash that assigns splits; changing it reshuffles prompts between splits."""
    demonstrations_fallback: Literal["chosen", "none"] = "chosen"
    """Without demonstration rows, the SFT set is the chosen responses of the pairs (``chosen``) or empty."""
    min_pairs: int = Field(1, ge=0)
    """The build fails with :class:`~tasks.data.preferences.EmptyPreferenceDataset` below this many pairs."""
    recent_batches: int | None = Field(None, gt=0)
    """Build from the newest N ingest batches only (None: every batch so far). Iterative,
    on-policy rounds (``pipeline.init_from: champion``) use 1: pairs sampled from earlier
    policies would keep pushing the champion further from its reference."""
    replay_refused: bool = False
    """With ``recent_batches``, also build from the batches of the rounds the gate refused since the
    champion was promoted (the home's round log): they were sampled from the same champion as the
    newest batch, so their feedback is as on-policy as its, and a refused round's feedback is not
    thrown away. After a promotion the champion is new and its refused rounds start again from none;
    after a promotion or rollback by hand, none are replayed (their feedback came from another model)."""

    @model_validator(mode="after")
    def _rating_thresholds(self) -> PreferenceSettings:
        if self.rating_undesirable_max >= self.rating_desirable_min:
            raise ValueError(f"rating_undesirable_max ({self.rating_undesirable_max}) must be below "
                             f"rating_desirable_min ({self.rating_desirable_min})")
        return self
