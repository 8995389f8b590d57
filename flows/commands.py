"""The CLI's command bodies (imported after the environment is prepared; see flows/cli.py)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from tasks import tracking
from tasks.config import PipelineConfig
from tasks.serving import serve_command

console = Console()


def _flow_kwargs(args: argparse.Namespace) -> dict:
    return {"config": args.config, "overrides": list(args.overrides or [])}


def cmd_run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow run``: one pipeline round. Exit 0 when the round completed (promoted or not);
    75 (try again later) when another run holds the home (``pipeline.lock_wait_s``)."""
    from flows.pipeline import alignment_pipeline
    from tasks.lock import HomeBusy

    try:
        alignment_pipeline(**_flow_kwargs(args), only_if_new_data=args.only_if_new_data)
    except HomeBusy as err:
        console.print(f"alignflow: {err}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 75
    return 0


def cmd_demo(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow demo --rounds N``: the closed loop."""
    if cfg.demo is None:
        console.print("[red]alignflow demo needs a config with a demo section (the default config has one)[/red]")
        return 2
    from flows.demo import closed_loop_demo

    closed_loop_demo(**_flow_kwargs(args), rounds=args.rounds)
    return 0


def cmd_ingest(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow ingest SOURCE``: validate only; non-zero past the quarantine threshold."""
    from tasks.data.report import EXIT_UNREADABLE, ingest_command, parse_columns

    try:
        columns = parse_columns(getattr(args, "column", None))
    except ValueError as err:
        print(err)
        return EXIT_UNREADABLE
    return ingest_command(args.source, args.kind, cfg.data, out_dir=cfg.home / "ingest-check", columns=columns)


def _policy_name(cfg: PipelineConfig) -> str:
    tracking.configure(cfg.home, cfg.pipeline.name)
    return tracking.policy_model_name(cfg.pipeline.name)


def cmd_promote(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow promote --version N``: manual promotion (recorded as such on the version)."""
    name = _policy_name(cfg)
    try:
        tracking.promote(name, str(args.version), reason="manual promotion (alignflow promote)")
    except tracking.TrackingError as err:
        console.print(f"[red]cannot promote {name} v{args.version}: {err.message}[/red]")
        return 1
    console.print(f"{name}: champion -> v{args.version}")
    return 0


def cmd_rollback(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow rollback``: the previously promoted version becomes champion again."""
    name = _policy_name(cfg)
    try:
        old, new = tracking.rollback(name)
    except (LookupError, tracking.TrackingError) as err:
        console.print(f"[red]rollback failed: {err}[/red]")
        return 1
    console.print(f"{name}: champion v{old} -> v{new} (v{old} marked rolled back)")
    return 0


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cmd_status(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow status``: champion, challenger and recent pipeline runs."""
    name = _policy_name(cfg)
    table = Table(title=f"{name} registry")
    for col in ("alias", "version", "created", "gate", "data digest", "method"):
        table.add_column(col)
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        version = tracking.alias_version(name, alias)
        if version is None:
            table.add_row(alias, "-", "-", "-", "-", "-")
            continue
        mv = tracking.model_version(name, version)
        table.add_row(alias, version, _when(mv.creation_timestamp), mv.tags.get("alignflow.gate", "-"),
                      mv.tags.get("alignflow.data_digest", "-"), mv.tags.get("alignflow.method", "-"))
    console.print(table)
    runs = tracking.recent_runs(cfg.pipeline.name, "prefect.flow_run_id", max_results=10)
    if runs is None:
        console.print("no runs yet")
        return 0
    recent = Table(title="recent pipeline runs")
    for col in ("started", "run", "status", "prefect flow run"):
        recent.add_column(col)
    for run in runs:
        recent.add_row(_when(run.info.start_time), run.info.run_name or run.info.run_id, run.info.status,
                       run.data.tags.get("prefect.flow_run_id", "-"))
    console.print(recent)
    champion = tracking.alias_version(name, tracking.CHAMPION)
    console.print(f"serve it: {serve_command(tracking.tracking_uri(cfg.home), name)}" if champion else "no champion yet")
    return 0


def cmd_serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow serve``: the retraining and monitoring deployments on their cron schedules."""
    from flows.deployments import serve_deployments

    serve_deployments(cfg, args.config, list(args.overrides or []))
    return 0


def cmd_monitor(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow monitor``: drift check of new feedback against the champion (one run); 75
    when another run holds the home (``pipeline.lock_wait_s``), as ``run``."""
    from flows.monitor import monitor_feedback
    from tasks.lock import HomeBusy

    try:
        result = monitor_feedback(**_flow_kwargs(args))
    except HomeBusy as err:
        console.print(f"alignflow: {err}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 75
    return 0 if result is not None else 1


def cmd_build_dataset(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow build-dataset SOURCE... --out DIR``: the library's training tables from feedback
    files, with the pipeline's validation and builder (``data`` and ``preferences`` sections)."""
    from tasks.data.export import build_dataset

    return build_dataset(list(args.sources), args.out, cfg.data, cfg.preferences, kind=args.kind)


def cmd_eval_export(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``alignflow eval-export``: a blinded side-by-side sheet of two policy versions for people."""
    from tasks.evaluation.human import export_sheet, read_prompts

    tracking.configure(cfg.home, cfg.pipeline.name)
    try:
        prompts = read_prompts(args.prompts) if args.prompts else None
        result = export_sheet(cfg, args.first, args.second, prompts, args.num_prompts, args.out)
    except (LookupError, ValueError, FileNotFoundError, tracking.TrackingError) as err:
        console.print(f"eval-export: {err}", style="red", markup=False, highlight=False)
        return 2
    left = ", ".join(f"{n} {why}" for why, n in result.left_out.items() if n)
    console.print(f"sheet {result.sheet_id}: {result.items} items, v{result.first_version} vs v{result.second_version} "
                  f"in random order and sides" + (f" (left out, answers {left})" if left else "") + "\n"
                  f"  {result.csv}\n  {result.jsonl}\nkey (keep it from the raters): "
                  f"{result.key}\nEach rater fills choice (a, b or tie) and annotator_id (one row per rater and item; "
                  "copy rows for more raters). Check a filled sheet with `alignflow ingest FILE`, then put it in the "
                  "landing folder: the next run records the human win rate.", markup=False, highlight=False)
    return 0
