"""Issue 19 (7): small things that read wrong.

``champion vNone``; ``fine-tune (dpo)`` when the loss is IPO; ``status`` and ``ingest`` without
``--config`` taking the demo's pipeline and threshold instead of the home's (or the defaults);
``ingest --kind demonstration`` turning thumbs-down answers into demonstrations. (The ``gpu``
concurrency-limit warning on CPU runs is checked on a whole run in tests/integration/test_readme.py.)
"""

from __future__ import annotations

import io
import json

import pandas as pd
from rich.console import Console

from flows.cli import main
from tasks.data.report import ingest_command
from tasks.data.settings import IngestSettings
from tasks.methods import label
from tasks.stages.register import RegistryRecord, decision_markdown
from tasks.stages.summary import PipelineSummary, render


def test_no_champion_reads_as_such_not_vnone():
    record = RegistryRecord(policy_model="mine-policy", policy_version="1", promoted=False, champion_version=None,
                            previous_champion=None, reasons=["Not promoted: 1 of 6 rules failed (win_rate)."])
    summary = PipelineSummary(pipeline="mine", home="/h", status="not-promoted", mlflow_run_id="r", experiment_id="1",
                              tracking_uri="sqlite:////h/mlflow.db", registry=record)
    console = Console(file=io.StringIO(), width=200)
    render(summary, console)
    text = console.file.getvalue()
    assert "vNone" not in text and "no champion yet" in text
    md = decision_markdown(record, {"checks": []})
    assert "vNone" not in md and "champion: none (before: none)" in md


def test_the_summary_names_the_loss_a_method_trains():
    assert label("dpo", "sigmoid") == "dpo"
    assert label("dpo", "ipo") == "dpo, loss ipo"
    assert label("ipo", "sigmoid") == "ipo" and label("simpo") == "simpo" and label("ppo") == "ppo"


def _thumbs(path):
    rows = [{"prompt": f"Review {i}", "response": f"answer {i}", "label": i % 3 != 0} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_ingest_as_demonstrations_quarantines_thumbs_down_answers(tmp_path):
    out = io.StringIO()
    code = ingest_command(str(_thumbs(tmp_path / "thumbs.jsonl")), "demonstration",
                          IngestSettings(quarantine_max_share=0.5), out_dir=tmp_path / "check", stream=out)
    text = out.getvalue()
    assert code == 0
    assert "valid:        20" in text and "quarantined:  10" in text, text
    assert "thumbs_down:label" in text and "ingest the file as kind binary" in text
    q = pd.read_parquet(tmp_path / "check" / "quarantine.parquet")
    assert all(json.loads(raw)["label"] is False for raw in q["raw"])


def _pairwise(path, bad: int, good: int):
    rows = [{"prompt": f"Review {i}", "response_a": f"good {i}", "response_b": f"bad {i}", "choice": "a"}
            for i in range(good)]
    rows += [{"prompt": f"Broken {i}", "response_a": "x", "response_b": "y", "choice": "maybe"} for i in range(bad)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_ingest_without_config_uses_the_home_pipeline_or_the_defaults_not_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNFLOW_HOME", raising=False)
    eight_percent = _pairwise(tmp_path / "export.jsonl", bad=8, good=92)
    # no pipeline in ./.alignflow: the default data.quarantine_max_share (0.05), not the demo's 0.1
    assert main(["ingest", str(eight_percent)]) == 1
    err = capsys.readouterr().err
    assert "default data settings; data.quarantine_max_share 0.05" in err
    # a pipeline that ran in this home with its own threshold: that one
    saved = tmp_path / ".alignflow" / "runs" / "mine" / "config-abc.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("pipeline: {name: mine}\ndata: {quarantine_max_share: 0.1}\n")
    assert main(["ingest", str(eight_percent)]) == 0
    assert "pipeline mine of" in capsys.readouterr().err


def test_status_without_config_shows_the_home_pipeline_or_says_there_is_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNFLOW_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["status"]) == 0
    out = capsys.readouterr()
    assert "no pipeline has run in" in out.err and "demo-policy" not in out.out
    saved = tmp_path / ".alignflow" / "runs" / "mine" / "config-abc.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("pipeline: {name: mine}\n")
    assert main(["status"]) == 0
    out = capsys.readouterr()
    assert "mine-policy" in out.out and "demo-policy" not in out.out and "pipeline mine of" in out.err


def test_registry_commands_without_config_act_on_the_home_pipeline_never_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNFLOW_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Nothing has run here: promoting would act on the demo's models; it stops naming the fix.
    assert main(["promote", "--version", "1"]) == 2
    assert "no pipeline has run in" in capsys.readouterr().err
    assert main(["rollback"]) == 2
    assert "pass --config FILE" in capsys.readouterr().err
    saved = tmp_path / ".alignflow" / "runs" / "mine" / "config-abc.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("pipeline: {name: mine}\n")
    code = main(["promote", "--version", "1"])  # the home's pipeline: its registry has no version 1
    err = capsys.readouterr().err
    assert "pipeline mine of" in err and "demo-policy" not in err
    assert code != 0
