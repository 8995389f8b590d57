"""Ingest + validate + build throughput on synthetic pairwise feedback.

    .venv/bin/python benchmarks/ingest_throughput.py [--rows 1000000] [--format jsonl|csv|parquet]
                                                     [--bad-share 0.01] [--messy] [--workdir DIR]
                                                     [--repeat N] [--pause SECONDS]

Generates (once, cached in the work folder) ``rows`` pairwise rows over rows/5 prompts, 4
responses per prompt, 50 annotators (one of them answering at random), with ``bad-share`` of
the rows broken in the ways real exports are (blank or missing text, identical responses,
invalid choice, control characters, invalid UTF-8, over-long text, unparseable timestamp,
duplicate rows). ``--messy`` also puts wrong-typed values and broken JSON lines among them,
which sends JSONL reading down its line-by-line path. Then, in a fresh process, it times the
pipeline's two data stages exactly as the flow runs them: ``landing.ingest`` (read, validate,
write validated tables and quarantine) and ``preferences.build_preferences`` (read, build,
write pairs/prompts/demonstrations and the card), and prints rows/s and peak memory.

Peak memory is the process's resident high-water mark (VmHWM) minus its resident size after
imports, compared with the Arrow in-memory size of the input table. The machine may be shared:
the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the movie was great terrible fine plot actors acting scene long short boring fun slow "
         "moving music score story ending character cast director script visual dull witty dark").split()


def _pages_allocated_mb() -> int:
    """Memory pages the kernel handed out so far, system-wide, in MiB (Linux ``/proc/vmstat``;
    -1 elsewhere). The difference over a stage is the fresh memory it touched (anonymous and
    page cache), which on a VM whose memory the host backs lazily costs more than the copying."""
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return -1
    pages = sum(int(line.split()[1]) for line in lines if line.startswith("pgalloc_"))
    return pages * 4096 >> 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def generate(path: Path, rows: int, bad_share: float, messy: bool, fmt: str, max_chars: int) -> dict:
    """Write the synthetic landing file; return its description (with the Arrow size of the rows)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    rng = np.random.default_rng(0)
    pool = [" ".join(rng.choice(WORDS, rng.integers(8, 16))) for _ in range(4000)]
    n_prompts = max(rows // 5, 1)
    p_idx = rng.integers(0, n_prompts, rows)
    j = rng.integers(0, 4, rows)
    k = (j + rng.integers(1, 4, rows)) % 4
    prompts = [f"Write about {pool[i % 4000]} ({i})" for i in p_idx.tolist()]
    resp_a = [f"{pool[(i * 7 + a) % 4000]} {pool[(i + a) % 4000]} [{i}.{a}]" for i, a in zip(p_idx.tolist(), j.tolist(), strict=True)]
    resp_b = [f"{pool[(i * 7 + b) % 4000]} {pool[(i + b) % 4000]} [{i}.{b}]" for i, b in zip(p_idx.tolist(), k.tolist(), strict=True)]
    annotators = rng.integers(0, 50, rows)
    prefer_a = (j < k) ^ (rng.random(rows) < 0.15)
    prefer_a = np.where(annotators == 49, rng.random(rows) < 0.5, prefer_a)
    choice = np.where(rng.random(rows) < 0.03, "tie", np.where(prefer_a, "a", "b")).astype(object)
    base = np.datetime64("2025-01-01T00:00:00")
    created = np.datetime_as_string(base + np.arange(rows).astype("timedelta64[s]")) + "Z"
    df = pd.DataFrame({"prompt": prompts, "response_a": resp_a, "response_b": resp_b, "choice": choice,
                       "annotator_id": [f"ann-{a:02d}" for a in annotators.tolist()], "created_at": created})
    bad = rng.choice(rows, int(rows * bad_share), replace=False)
    kinds = ["blank", "missing", "identical", "choice", "control", "utf8", "too_long", "timestamp", "duplicate"]
    if messy:
        kinds += ["wrong_type", "broken_json"]
    which = np.array(kinds, dtype=object)[rng.integers(0, len(kinds), len(bad))]
    df = df.astype(object)
    for kind in kinds:
        rows_k = bad[which == kind]
        if kind == "blank":
            df.loc[rows_k, "prompt"] = "   "
        elif kind == "missing":
            df.loc[rows_k, "response_b"] = None
        elif kind == "identical":
            df.loc[rows_k, "response_b"] = df.loc[rows_k, "response_a"].to_numpy()
        elif kind == "choice":
            df.loc[rows_k, "choice"] = "c"
        elif kind == "control":
            df.loc[rows_k, "response_a"] = df.loc[rows_k, "response_a"] + "\x07"
        elif kind == "utf8":
            df.loc[rows_k, "response_a"] = df.loc[rows_k, "response_a"] + " BADBYTES"
        elif kind == "too_long":
            df.loc[rows_k, "response_b"] = "x" * (max_chars + 1)
        elif kind == "timestamp":
            df.loc[rows_k, "created_at"] = "not a time"
        elif kind == "duplicate":
            src = np.maximum(rows_k - 1, 0)
            df.loc[rows_k] = df.loc[src].to_numpy()
        elif kind == "wrong_type":
            df.loc[rows_k, "choice"] = 3
        elif kind == "broken_json":
            df.loc[rows_k, "prompt"] = "BROKENJSON"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        df.loc[df["choice"].map(lambda v: not isinstance(v, str)), "choice"] = "3"
        df.to_parquet(path)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        import orjson

        with path.open("wb") as f:
            for rec in df.to_dict("records"):
                line = orjson.dumps(rec)
                if b"BROKENJSON" in line:
                    line = line[:-5]
                f.write(line.replace(b" BADBYTES", b" \xff\xfe") + b"\n")
    if fmt == "csv":
        data = path.read_bytes().replace(b" BADBYTES", b" \xff\xfe")
        path.write_bytes(data)
    size = pa.Table.from_pandas(df.astype({"choice": str}), preserve_index=False).nbytes
    return {"rows": rows, "bad_rows": int(len(bad)), "format": fmt, "messy": messy, "arrow_bytes": int(size),
            "file_bytes": path.stat().st_size}


def measure(workdir: Path, fmt: str, max_chars: int) -> dict:
    """Run ingest + build in this process and return timings and memory."""
    import shutil

    from tasks.data.landing import ingest
    from tasks.data.preferences import build_preferences
    from tasks.data.settings import IngestSettings, PreferenceSettings

    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    settings = IngestSettings(landing_dir=str(workdir / f"landing-{fmt}"), ledger_path=str(out / "ledger.jsonl"),
                              max_text_chars=max_chars, quarantine_max_share=0.05)
    base_rss = _status_kb("VmRSS")
    m0, t0 = _pages_allocated_mb(), time.perf_counter()
    result = ingest(settings, out)
    m1, t1 = _pages_allocated_mb(), time.perf_counter()
    build = build_preferences(out / "validated", out / "dataset", PreferenceSettings())
    m2, t2 = _pages_allocated_mb(), time.perf_counter()
    return {"rows_in": result.report["rows_in"], "rows_valid": result.report["rows_valid"],
            "rows_quarantined": result.report["rows_quarantined"], "top_reasons": list(result.report["reasons"].items())[:10],
            "ingest_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0, "pairs": build.counts["pairs"],
            "flagged_annotators": build.counts["annotators_flagged"],
            "base_rss_mb": base_rss / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "ingest_alloc_mb": m1 - m0, "build_alloc_mb": m2 - m1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--format", choices=["jsonl", "csv", "parquet"], default="jsonl")
    ap.add_argument("--bad-share", type=float, default=0.01)
    ap.add_argument("--messy", action="store_true", help="also wrong types and broken JSON lines")
    ap.add_argument("--max-chars", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/alignflow-ingest-bench")
    ap.add_argument("--repeat", type=int, default=1, help="measurements (each in a fresh process); prints the median")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between measurements (on a VM whose host reclaims idle memory, runs started "
                         "right after one another find warmer memory than one started after a pause)")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tag = f"{args.rows}-{args.bad_share}-{'messy' if args.messy else 'clean'}"
    workdir = Path(args.workdir) / tag
    if args.measure_only:
        print(json.dumps(measure(workdir, args.format, args.max_chars)))
        return
    ext = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}[args.format]
    data_path = workdir / f"landing-{args.format}" / f"feedback.{ext}"
    meta_path = workdir / f"landing-{args.format}.json"
    if not data_path.exists() or not meta_path.exists():
        print(f"generating {args.rows} rows ({args.format}) in {data_path} ...", flush=True)
        meta = generate(data_path, args.rows, args.bad_share, args.messy, args.format, args.max_chars)
        meta_path.write_text(json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    rates = []
    for run in range(args.repeat):
        if run:
            time.sleep(args.pause)
            print()
        rates.append(_measure_and_report(args, meta))
    if args.repeat > 1:
        print(f"\n{args.repeat} runs, {args.pause:g} s apart: median {statistics.median(rates):,.0f} rows/s "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f})")


def _measure_and_report(args: argparse.Namespace, meta: dict) -> float:
    """One measurement in a fresh process; prints it and returns the end-to-end rows/s."""
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, __file__, "--measure-only", "--rows", str(args.rows), "--format",
                           args.format, "--bad-share", str(args.bad_share), "--max-chars", str(args.max_chars),
                           "--workdir", args.workdir] + (["--messy"] if args.messy else []),
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (usage.ru_utime - cpu_before.ru_utime) + (usage.ru_stime - cpu_before.ru_stime)
    data_mb = meta["arrow_bytes"] / 2**20
    peak_delta = r["peak_rss_mb"] - r["base_rss_mb"]
    print(f"input: {meta['rows']} rows, {meta['bad_rows']} broken ({args.format}, {'messy' if args.messy else 'clean'} "
          f"types), file {meta['file_bytes'] / 2**20:.0f} MiB, in-memory (Arrow) {data_mb:.0f} MiB")
    print(f"rows in {r['rows_in']}, valid {r['rows_valid']}, quarantined {r['rows_quarantined']}; "
          f"pairs {r['pairs']}; flagged annotators {r['flagged_annotators']}")
    print(f"top reasons: {r['top_reasons']}")
    print(f"ingest {r['ingest_s']:.2f} s + build {r['build_s']:.2f} s = {r['total_s']:.2f} s -> "
          f"{r['rows_in'] / r['total_s']:,.0f} rows/s end to end (ingest alone {r['rows_in'] / r['ingest_s']:,.0f} rows/s)")
    print(f"peak RSS {r['peak_rss_mb']:.0f} MiB (after imports {r['base_rss_mb']:.0f} MiB): +{peak_delta:.0f} MiB "
          f"= {peak_delta / data_mb:.2f}x the data's in-memory size")
    if r["ingest_alloc_mb"] >= 0:
        print(f"fresh memory pages (system-wide, incl. page cache of written files): ingest {r['ingest_alloc_mb']} MiB, "
              f"build {r['build_alloc_mb']} MiB")
    print(f"CPU time of the measuring process (imports included): {cpu_s:.2f} s; "
          f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores")
    return r["rows_in"] / r["total_s"]

if __name__ == "__main__":
    main()
