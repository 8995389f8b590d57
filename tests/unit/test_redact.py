"""Credentials never leave in a URL that alignflow prints, logs or saves (issue 14): the summary's
UI hints, the Prefect link artifact, the returned/saved summary, Prefect's own UI links."""

from __future__ import annotations

import os
import time

import pytest
from rich.console import Console

from tasks.redact import redact_text, redact_url
from tasks.stages import summary as summary_mod
from tasks.stages.summary import PipelineSummary, publish_summary, render, ui_hints

SECRETS = ("s3cret", "hunter2", "pgpass", "tok123")


@pytest.mark.parametrize("url, expected", [
    ("https://bob:s3cret@mlflow.example:5000", "https://bob:***@mlflow.example:5000"),
    ("https://tok123@host/api", "https://***@host/api"),
    ("postgresql+psycopg://mlflow:pgpass@db:5432/mlflow", "postgresql+psycopg://mlflow:***@db:5432/mlflow"),
    ("http://h/api?access_token=tok123&page=2", "http://h/api?access_token=***&page=2"),
    ("sqlite:////home/a/mlflow.db", "sqlite:////home/a/mlflow.db"),
    ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
    ("databricks", "databricks"),
    ("", ""),
])
def test_redact_url_masks_passwords_and_tokens_only(url, expected):
    assert redact_url(url) == expected


def test_redact_text_masks_every_url_in_a_line():
    line = "MLflow at https://bob:s3cret@m:5000/#/x, Prefect at http://alice:hunter2@p/api (ok)"
    out = redact_text(line)
    assert not any(s in out for s in SECRETS)
    assert "https://bob:***@m:5000/#/x" in out and "http://alice:***@p/api" in out


@pytest.fixture
def secret_servers(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example:5000/")
    monkeypatch.setenv("PREFECT_API_URL", "https://alice:hunter2@prefect.example/api")


def _summary(uri: str = "https://bob:s3cret@mlflow.example:5000/") -> PipelineSummary:
    return PipelineSummary(pipeline="p", home="/tmp/h", mlflow_run_id="r1", experiment_id="7",
                           tracking_uri=uri, flow_run_id="f1", status="promoted")


def test_summary_hints_and_saved_summary_hold_no_credentials(secret_servers):
    summary = _summary()
    hints = "\n".join(ui_hints(summary))
    assert not any(s in hints for s in SECRETS), hints
    assert "https://bob:***@mlflow.example:5000/#/experiments/7/runs/r1" in hints
    assert "https://alice:***@prefect.example/runs/flow-run/f1" in hints
    assert "s3cret" not in summary.model_dump_json()
    db = _summary("postgresql+psycopg://mlflow:pgpass@db:5432/mlflow")
    assert "pgpass" not in db.model_dump_json()


def test_printed_summary_and_link_artifact_hold_no_credentials(secret_servers, monkeypatch):
    saved: list[tuple] = []
    monkeypatch.setattr(summary_mod, "create_table_artifact", lambda *a, **k: saved.append(("table", a, k)))
    monkeypatch.setattr(summary_mod, "create_link_artifact", lambda *a, **k: saved.append(("link", a, k)))
    console = Console(record=True, width=200)
    monkeypatch.setattr(summary_mod, "report_console", lambda: console)
    publish_summary(_summary(), [], time.monotonic())
    printed = console.export_text()
    assert "mlflow.example" in printed and not any(s in printed for s in SECRETS), printed
    [link] = [entry for entry in saved if entry[0] == "link"]
    assert "mlflow.example" in repr(link) and not any(s in repr(link) for s in SECRETS), link


def test_embedded_store_hint_masks_a_database_password(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    console = Console(record=True, width=200)
    render(_summary("postgresql://mlflow:pgpass@db/mlflow"), console)
    assert "pgpass" not in console.export_text()


def test_prefect_ui_links_come_from_a_redacted_api_url(monkeypatch, tmp_path):
    from flows.cli import _prepare_environment

    for var in ("PREFECT_UI_URL", "PREFECT_RESULTS_DEFAULT_SERIALIZER", "PREFECT_LOGGING_LOG_PRINTS",
                "PREFECT_SERVER_ANALYTICS_ENABLED", "TOKENIZERS_PARALLELISM", "GIT_PYTHON_REFRESH",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "PREFECT_API_AUTH_STRING",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: nothing leaks to others
    monkeypatch.setenv("PREFECT_API_URL", "https://alice:hunter2@prefect.example/api")
    _prepare_environment(tmp_path)
    # the same basic auth, sent by Prefect's client from its auth string instead of the URL
    assert os.environ["PREFECT_API_URL"] == "https://prefect.example/api"
    assert os.environ["PREFECT_API_AUTH_STRING"] == "alice:hunter2"
    assert os.environ["PREFECT_UI_URL"] == "https://prefect.example"
    # an auth string already set wins: the URL keeps its user info, the links are masked
    monkeypatch.setenv("PREFECT_API_URL", "https://alice:hunter2@prefect.example/api")
    monkeypatch.delenv("PREFECT_UI_URL")
    _prepare_environment(tmp_path)
    assert os.environ["PREFECT_UI_URL"] == "https://alice:***@prefect.example"
    assert os.environ["PREFECT_RESULTS_DEFAULT_SERIALIZER"] == "json"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # MLflow's own unmasked links


def test_run_params_and_tags_saved_in_mlflow_hold_no_credentials(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks import tracking

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking, "_ENV_SET_BY_US", {})
    experiment = tracking.configure(tmp_path, "redact")
    run_id = tracking.start_parent_run(experiment, "r", tags={})
    tracking.log_params(run_id, {"model.policy.name_or_path": "https://tok123@hub.example/m",
                                 "dpo.beta": 0.1})
    tracking.set_tags(run_id, {"alignflow.trigger_error": "ConnectError for https://alice:hunter2@p.example/api"})
    run = MlflowClient().get_run(run_id)
    saved = repr(run.data.params) + repr(run.data.tags)
    assert "p.example" in saved and not any(s in saved for s in SECRETS), saved
    assert run.data.params["dpo.beta"] == "0.1"


def test_a_password_in_the_tracking_uri_never_reaches_mlflows_urls_or_errors(tmp_path, monkeypatch):
    """MLflow puts its server URL in "View run" lines and in every request error; the password
    moves to MLFLOW_TRACKING_USERNAME/PASSWORD instead. The server here does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks import tracking

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking, "_ENV_SET_BY_US", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:s3cret@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    previous = mlflow.get_tracking_uri()
    try:
        with pytest.raises(MlflowException) as err:
            tracking.configure(tmp_path, "redact")
        assert "127.0.0.1:9" in str(err.value) and "s3cret" not in str(err.value)
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9/"
    finally:
        mlflow.set_tracking_uri(previous)  # no later test of this process talks to the dead server
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
