"""Seconds and fresh memory pages per stage function of ingest + build (where the time goes).

    .venv/bin/python benchmarks/ingest_phases.py [--workdir /tmp/ingest1m/1000000-0.01-clean] [--no-split-files]

Runs on the landing folder that ``benchmarks/ingest_throughput.py`` generated (run it first),
wrapping the stage functions of ``tasks.data.landing``, ``tasks.data.validate`` and
``tasks.data.preferences`` with a timer. Fresh pages are the system-wide ``/proc/vmstat``
allocations over the call (see ``ingest_throughput._pages_allocated_mb``). ``--no-split-files``
skips the per-split output files, to show what writing each table twice costs (a measurement
only: the build it leaves is incomplete). Nested stages are also counted in their callers.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ingest_throughput import _pages_allocated_mb  # noqa: E402

import tasks.data.landing as landing  # noqa: E402
import tasks.data.preferences as preferences  # noqa: E402
import tasks.data.validate as validate  # noqa: E402
from tasks.data.settings import IngestSettings, PreferenceSettings  # noqa: E402

STAGES = [(landing, "pending_sources"), (landing, "read_source"), (validate, "_prepare"),
          (validate, "_schema_problems"), (validate, "_duplicate_problems"), (landing, "validate_tables"),
          (landing, "write_quarantine"), (validate.ValidationResult, "write_valid"),
          (preferences, "encode_feedback"), (preferences, "annotator_quality"), (preferences, "_resolve"),
          (preferences, "_write_outputs")]


def _timed(owner, name: str, records: list) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        m0, t0 = _pages_allocated_mb(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            records.append((name, time.perf_counter() - t0, _pages_allocated_mb() - m0))

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/ingest1m/1000000-0.01-clean")
    ap.add_argument("--no-split-files", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    if not (work / "landing-jsonl").exists():
        sys.exit(f"no landing-jsonl in {work}: run benchmarks/ingest_throughput.py first")
    records: list = []
    for owner, name in STAGES:
        _timed(owner, name, records)
    if args.no_split_files:
        preferences._write_split_parts = lambda writers, part, codes: None
    out = work / "out-phases"
    shutil.rmtree(out, ignore_errors=True)
    settings = IngestSettings(landing_dir=str(work / "landing-jsonl"), ledger_path=str(out / "ledger.jsonl"),
                              max_text_chars=2000, quarantine_max_share=0.05)
    m0, t0 = _pages_allocated_mb(), time.perf_counter()
    landing.ingest(settings, out)
    m1, t1 = _pages_allocated_mb(), time.perf_counter()
    preferences.build_preferences(out / "validated", out / "dataset", PreferenceSettings())
    m2, t2 = _pages_allocated_mb(), time.perf_counter()
    for name, seconds, mib in records:
        print(f"{name:22s} {seconds:6.2f} s {mib:6d} MiB fresh")
    print(f"ingest {t1 - t0:.2f} s, {m1 - m0} MiB fresh; build {t2 - t1:.2f} s, {m2 - m1} MiB fresh")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
