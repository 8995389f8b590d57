"""``alignflow build-dataset SOURCE... --out DIR``: feedback files to the library's training tables.

The same validation and builder as the pipeline (:func:`tasks.data.landing.ingest`,
:func:`tasks.data.preferences.build_preferences`), without a pipeline home, ledger, Prefect or
MLflow: every source is read on every call (a fresh ledger in a temporary folder). ``DIR``
gets the builder's files (``pairs-{train,validation,test}.parquet``, ``prompts-*``,
``demonstrations-*``, ``unpaired-*``, the data card) and, when rows failed, ``quarantine.parquet``;
``python -m alignment.train`` reads the pair and demonstration tables as they are.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from tasks.data.landing import ingest
from tasks.data.preferences import EmptyPreferenceDataset, build_preferences
from tasks.data.settings import IngestSettings, PreferenceSettings, SourceSettings
from tasks.data.validate import QuarantineThresholdExceeded

EXIT_OK, EXIT_REFUSED, EXIT_UNREADABLE = 0, 1, 2


def build_dataset(sources: list[str], out_dir: str | Path, data: IngestSettings, preferences: PreferenceSettings,
                  *, kind: str | None = None, stream: TextIO | None = None) -> int:
    """Validate ``sources`` as one batch and build the preference tables into ``out_dir``.

    Returns 0 when built; 1 when the quarantined share is over ``data.quarantine_max_share``
    or too few pairs result (``preferences.min_pairs``); 2 when a source cannot be read. Prints
    counts, the files written and how to train on them.
    """
    out = stream or sys.stdout
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="alignflow-build-") as tmp:
        settings = data.model_copy(update={
            "landing_dir": None, "ledger_path": str(Path(tmp) / "ledger.jsonl"),
            "sources": [SourceSettings(path=s, kind=kind, layout=data.landing_layout) for s in sources]})
        try:
            result = ingest(settings, Path(tmp) / "ingest")
        except QuarantineThresholdExceeded as err:
            print(f"not built: {err} (data.quarantine_max_share)", file=out)
            return EXIT_REFUSED
        except (FileNotFoundError, ValueError, OSError) as err:
            print(f"cannot read {' '.join(sources)}: {err}", file=out)
            return EXIT_UNREADABLE
        report = result.report or {}
        print(f"rows in {report.get('rows_in', 0)}, valid {report.get('rows_valid', 0)}, "
              f"quarantined {report.get('rows_quarantined', 0)}", file=out)
        out_dir.mkdir(parents=True, exist_ok=True)
        if result.quarantine and report.get("rows_quarantined"):
            shutil.copyfile(result.quarantine, out_dir / "quarantine.parquet")
            print(f"quarantine: {out_dir / 'quarantine.parquet'}", file=out)
        try:
            build = build_preferences({k: [p] for k, p in result.validated.items()}, out_dir, preferences)
        except EmptyPreferenceDataset as err:
            print(f"not built: {err}", file=out)
            return EXIT_REFUSED
    counts = build.counts
    print(f"pairs {counts.get('pairs', 0)} (dataset digest {build.digest[:12]})", file=out)
    for table, per_split in build.split_files.items():
        for split, path in sorted(per_split.items()):
            print(f"  {table:<15} {split:<10} {path}", file=out)
    pairs = build.split_files.get("pairs", {})
    print(f"train on it: train_path: {pairs.get('train', build.pairs)} and eval_path: {pairs.get('validation')} "
          "in dpo.yaml, then python -m alignment.train dpo --config dpo.yaml", file=out)
    return EXIT_OK
