"""``alignflow ingest SOURCE [--kind KIND]``: validate only, print the counts and top reasons.

The CLI (flows/cli.py) calls :func:`ingest_command`; nothing is ingested (no validated tables,
no ledger entry). With ``out_dir`` the quarantine is written there for inspection.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from tasks.data.landing import read_and_validate, write_quarantine
from tasks.data.readers import FILE_FORMATS, is_saved_dataset, list_source_files
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import ValidationReport

EXIT_OK, EXIT_OVER_THRESHOLD, EXIT_UNREADABLE = 0, 1, 2


def format_report(report: ValidationReport, top: int = 10) -> str:
    """Counts, share against the limit, top reasons and per-file counts, as plain text."""
    lines = [f"rows in:      {report.rows_in}",
             f"valid:        {report.rows_valid}" + (f"  ({', '.join(f'{k} {v}' for k, v in report.valid_by_kind.items())})"
                                                     if report.valid_by_kind else ""),
             f"quarantined:  {report.rows_quarantined}  ({report.quarantine_share:.2%}; limit {report.max_share:.2%})"]
    if report.reasons:
        lines.append("top reasons:")
        lines += [f"  {n:>8}  {reason}" for reason, n in report.top_reasons(top)]
    if len(report.files) > 1:
        lines.append("per file:")
        lines += [f"  {f.rows_in:>8} in {f.rows_valid:>8} valid {f.rows_quarantined:>8} quarantined  {f.source_file}"
                  for f in report.files]
    for f in report.files:
        lines += [f"note: {f.source_file}: {note}" for note in f.notes]
    return "\n".join(lines)


def _sources(source: str, kind: str | None, settings: IngestSettings,
             columns: dict[str, str]) -> list[SourceSettings]:
    """The files of ``source``; under a folder, symlinks that resolve outside it are listed too:
    :func:`~tasks.data.landing.read_and_validate` refuses them unread (``symlink_outside_landing``)."""
    path = Path(source)
    if path.is_dir() and not is_saved_dataset(path):
        refused: list[Path] = []
        files = sorted([*list_source_files(path, settings.landing_patterns, refused), *refused])
        return [SourceSettings(path=str(f), kind=kind, layout=settings.landing_layout, columns=columns) for f in files]
    return [SourceSettings(path=source, kind=kind, layout=settings.landing_layout, columns=columns)]


def parse_columns(pairs: list[str] | None) -> dict[str, str]:
    """``["question=prompt", ...]`` (source column = field) as a rename map. Raises ValueError."""
    out = {}
    for pair in pairs or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--column {pair!r}: expected SOURCE_COLUMN=FIELD, e.g. question=prompt")
        out[old.strip()] = new.strip()
    return out


def ingest_command(source: str, kind: str | None, settings: IngestSettings, *, out_dir: str | Path | None = None,
                   stream: TextIO | None = None, columns: dict[str, str] | None = None) -> int:
    """Validate ``source`` (a file, a folder of files, a saved dataset or a hub id) and print a report.

    ``columns``: renames applied first, source column -> field (as ``data.sources[].columns``).
    Returns 0 when the quarantined share is within ``settings.quarantine_max_share``, 1 when it
    is over (the message names the counts and top reasons), 2 when the source cannot be read
    (missing, or no file of it readable: those files are still reported).
    """
    out = stream or sys.stdout
    try:
        sources = _sources(source, kind, settings, columns or {})
        if not sources:
            print(f"no feedback files under {source} (patterns {settings.landing_patterns}; "
                  f"extensions {sorted(FILE_FORMATS)})", file=out)
            return EXIT_UNREADABLE
        if Path(source).is_dir() and not is_saved_dataset(Path(source)):  # the folder is the landing folder
            settings = settings.model_copy(update={"landing_dir": source})
        result = read_and_validate(sources, settings)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"cannot read {source}: {err}", file=out)
        return EXIT_UNREADABLE
    print(format_report(result.report), file=out)
    if out_dir is not None and len(result.quarantine):
        path = write_quarantine(result, Path(out_dir) / "quarantine.parquet")
        print(f"quarantine:   {path}", file=out)
    if all(f.unreadable for f in result.report.files):
        print(f"cannot read {source}: " + "; ".join(n for f in result.report.files for n in f.notes[:1]), file=out)
        return EXIT_UNREADABLE
    if result.report.exceeded:
        print(f"FAILED: {result.report.rows_quarantined} of {result.report.rows_in} rows quarantined, "
              f"over the limit of {result.report.max_share:.2%} (data.quarantine_max_share)", file=out)
        return EXIT_OVER_THRESHOLD
    return EXIT_OK
