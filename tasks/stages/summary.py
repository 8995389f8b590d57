"""The end-of-run summary: a console table, a Prefect table artifact, links to the MLflow run,
and the commands that open the MLflow and Prefect UIs on these runs."""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field, field_validator
from rich.console import Console
from rich.table import Table

from tasks.progress import run_logger
from tasks.records import StageTiming
from tasks.redact import redact_url
from tasks.serving import serve_command
from tasks.stages.register import RegistryRecord, version_label


class PipelineSummary(BaseModel):
    """What a pipeline round did, returned by the flow and printed at the end."""

    pipeline: str
    home: str
    status: str = "running"
    """promoted, not-promoted, unchanged (nothing new) or no-new-data."""
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    flow_run_id: str = ""
    registry: RegistryRecord | None = None
    evaluation: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageTiming] = Field(default_factory=list)
    wall_s: float = 0.0
    stage_s: float = 0.0

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        """The summary is printed, returned and saved: a password in the URI is masked."""
        return redact_url(uri)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


CELL_CHARS = 56
"""Widest key-figures cell of the table artifact: with the other columns it fits a 1,400 px
window beside the Prefect UI's sidebar (a longer cell is cut off there, not wrapped)."""


def figure_lines(metrics: dict[str, Any], width: int = CELL_CHARS) -> list[str]:
    """``k=v`` figures (floats rounded) packed into lines of at most ``width`` characters; a
    single figure longer than that (a path) is broken after a ``/`` or, failing that, hard."""
    pieces: list[str] = []
    for key, value in metrics.items():
        value = _fmt(value)
        if re.fullmatch(r"[0-9a-f]{32,}", value):  # a digest: its head identifies it
            value = value[:12] + "…"
        text = f"{key}={value}"
        while len(text) > width:
            cut = text.rfind("/", 0, width) + 1 or width
            pieces.append(text[:cut])
            text = text[cut:]
        pieces.append(text)
    lines: list[str] = []
    for piece in pieces:
        if lines and len(lines[-1]) + 2 + len(piece) <= width:
            lines[-1] += ", " + piece
        else:
            lines.append(piece)
    return lines or [""]


def table_rows(rows: list[StageTiming]) -> list[dict[str, Any]]:
    """The summary table artifact's rows: one per stage, continued on rows with an empty stage
    where its key figures do not fit one cell (:func:`figure_lines`)."""
    out = []
    for r in rows:
        for i, line in enumerate(figure_lines(r.metrics)):
            first = i == 0
            out.append({"stage": r.stage if first else "", "status": r.status if first else "",
                        "seconds": round(r.seconds, 1) if first else "", "key figures": line})
    return out


def run_link(summary: PipelineSummary) -> str | None:
    """The MLflow run's web address on the configured tracking server (credentials masked);
    None when the store is not a server (embedded SQLite, a database URI): no URL serves it."""
    uri = redact_url(summary.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{summary.experiment_id}/runs/{summary.mlflow_run_id}"


def _tool(name: str) -> str:
    """This environment's console script ``name`` by its path: the printed command works as
    written in a shell whose PATH lacks the environment (a fresh clone's ``.venv``)."""
    return shlex.quote(str(Path(sys.executable).parent / name))


def ui_hints(summary: PipelineSummary) -> list[str]:
    """How to look at this run in the MLflow UI and the Prefect UI, and serve the champion."""
    mlflow_url = redact_url(summary.tracking_uri)  # shown and saved: no credentials
    if mlflow_url.startswith("http"):
        mlflow_cmd = f"open {mlflow_url.rstrip('/')}"
        base = mlflow_url.rstrip("/")
    else:
        mlflow_cmd = f"{_tool('mlflow')} ui --backend-store-uri {summary.tracking_uri} --port 5000"
        base = "http://127.0.0.1:5000"
    run_url = f"{base}/#/experiments/{summary.experiment_id}/runs/{summary.mlflow_run_id}"
    api = redact_url(os.environ.get("PREFECT_API_URL") or "")
    if api:
        prefect_cmd = f"open {api.removesuffix('/api')}"
        prefect_url = f"{api.removesuffix('/api')}/runs/flow-run/{summary.flow_run_id}"
    else:
        prefect_home = os.environ.get("PREFECT_HOME", f"{summary.home}/prefect")
        prefect_cmd = f"PREFECT_HOME={prefect_home} {_tool('prefect')} server start"
        prefect_url = f"http://127.0.0.1:4200/runs/flow-run/{summary.flow_run_id}"
    hints = [f"MLflow UI:  {mlflow_cmd}   then {run_url}",
             f"Prefect UI: {prefect_cmd}   then {prefect_url}"]
    if summary.registry is not None and summary.registry.champion_version:
        hints.append(f"Serve it:   {serve_command(summary.tracking_uri, summary.registry.policy_model)}")
    return hints


def report_console(piped_width: int = 110) -> Console:
    """A console for end-of-run tables: the terminal's width, or ``piped_width`` columns when piped
    to a log (rich's 80-column default there folds every row of the tables; a table of many
    columns, like the closed loop's, asks for more so its figures are not cut to "0.7…")."""
    return Console(width=None if sys.stdout.isatty() else piped_width)


def render(summary: PipelineSummary, console: Console | None = None) -> None:
    """Print the stage table, the registry state and the UI hints."""
    console = console or report_console()
    table = Table(title=f"alignflow · {summary.pipeline} · {summary.status}", show_lines=False)
    for column in ("stage", "status", "seconds", "key figures"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for row in summary.stages:
        table.add_row(row.stage, row.status, f"{row.seconds:.1f}", "\n".join(figure_lines(row.metrics)))
    console.print(table)
    console.print(f"wall {summary.wall_s:.1f} s, stage work {summary.stage_s:.1f} s, "
                  f"orchestration {max(summary.wall_s - summary.stage_s, 0):.1f} s")
    if summary.evaluation:
        console.print("evaluation: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.evaluation.items()))
    if summary.registry:
        r = summary.registry
        if summary.status == "unchanged":
            console.print(f"registry: nothing new to train; {r.policy_model} champion {version_label(r.champion_version)} "
                          "already reflects this data and config")
        else:
            verdict = "promoted to @champion" if r.promoted else "not promoted"
            console.print(f"registry: {r.policy_model} v{r.policy_version} @challenger, {verdict}; "
                          + (f"champion is v{r.champion_version}" if r.champion_version else "no champion yet"))
        for reason in r.reasons[:6]:
            console.print(f"  - {reason}")
    for hint in ui_hints(summary):
        console.print(hint)


def log_summary(summary: PipelineSummary) -> None:
    """The summary as lines of the run's log (the Prefect UI's Logs tab shows the round's outcome
    and each stage's figures without opening an artifact)."""
    logger = run_logger()
    logger.info("Round %s: %s (wall %.1f s, stage work %.1f s)", summary.pipeline, summary.status,
                summary.wall_s, summary.stage_s)
    for row in summary.stages:
        figures = ", ".join(figure_lines(row.metrics, width=10**6)) if row.metrics else ""
        logger.info("Stage %s: %s in %.1f s%s", row.stage, row.status, row.seconds, f"; {figures}" if figures else "")


def publish_summary(summary: PipelineSummary, rows: list[StageTiming], started: float) -> dict[str, Any]:
    """Fill timings, print, leave Prefect artifacts; returns the summary as a dict."""
    summary.stages = rows
    summary.wall_s = time.monotonic() - started
    summary.stage_s = sum(r.seconds for r in rows)
    render(summary)
    log_summary(summary)
    key = f"{summary.pipeline}-run-summary".replace("_", "-")
    create_table_artifact(table_rows(rows), key=key, description=f"alignflow run summary ({summary.status})")
    link_key = f"{summary.pipeline}-mlflow-run".replace("_", "-")
    link = run_link(summary)
    if link is not None:
        create_link_artifact(link, link_text="MLflow run", key=link_key)
    else:  # no server to link to: say how to open the store, not a guessed address
        create_markdown_artifact(f"MLflow run `{summary.mlflow_run_id}` (experiment {summary.experiment_id}) is in "
                                 f"`{redact_url(summary.tracking_uri)}`. Open it with:\n\n"
                                 f"    {ui_hints(summary)[0].removeprefix('MLflow UI:').strip()}",
                                 key=link_key, description="MLflow run (embedded store)")
    return summary.model_dump(mode="json")
