"""The feedback data layer (no Prefect, no MLflow: the stages in :mod:`tasks.stages` wrap it).

Modules, in the order data flows through them:

* :mod:`~tasks.data.settings` — ``IngestSettings`` (``data:``) and ``PreferenceSettings`` (``preferences:``).
* :mod:`~tasks.data.scan`, :mod:`~tasks.data.readers` — JSONL/CSV/Parquet/``datasets``/hub sources
  into raw tables; unreadable rows become read errors, never exceptions.
* :mod:`~tasks.data.formats` — public layouts (prompt/chosen/rejected, HH-RLHF, UltraFeedback).
* :mod:`~tasks.data.coerce`, :mod:`~tasks.data.schemas`, :mod:`~tasks.data.validate` — typing,
  the pandera models of the five kinds, quarantine with every reason, the report and the
  ``QuarantineThresholdExceeded`` error.
* :mod:`~tasks.data.landing` — ``ingest``: new landing files (ledger of content digests) to
  validated tables, quarantine and report.
* :mod:`~tasks.data.keys`, :mod:`~tasks.data.votes`, :mod:`~tasks.data.aggregate`,
  :mod:`~tasks.data.preferences`, :mod:`~tasks.data.card` — ``build_preferences``: canonical
  pairs, prompts, demonstrations, splits, digest and data card.
* :mod:`~tasks.data.report` — ``ingest_command`` behind ``alignflow ingest SOURCE``.
"""
