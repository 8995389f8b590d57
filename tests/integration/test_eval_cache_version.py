"""An evaluation cached by an older version is not handed to the gate (issue 14): its record lacks
the guard figures added since (repeated trigrams, fluency), and the gate would fail the candidate
on them as "not measured". The cache key carries the report's fields and the evaluation code's
version (:func:`tasks.stages.evaluate.evaluation_version`), and a cached record that still lacks a
field the report has now is a miss: the round evaluates again (:func:`evaluation_complete`)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

import tasks.evaluation.suite as suite_module
import tasks.stages.evaluate as evaluate_module
from tasks.config import load_pipeline_config
from tasks.evaluation.suite import EvalOutput
from tasks.records import ModelRecord
from tasks.stages.cached import run_cached
from tasks.stages.data import DatasetRecord
from tasks.stages.evaluate import (
    evaluate_task,
    evaluation_complete,
    evaluation_version,
    gate_decision,
    missing_report_fields,
)
from tests.integration.pipeline_helpers import TINY
from tests.unit.test_gate import report

GUARDS = ("repeated_trigram_rate", "fluency")
"""Figures the gate reads that an older version's report did not have."""


def _older(report_dict: dict) -> dict:
    """The same report as a version before the readability guards wrote it."""
    old = json.loads(json.dumps(report_dict))
    for role in ("candidate", "champion", "reference"):
        for name in GUARDS:
            old[role].pop(name)
    return old


def test_a_report_without_a_current_field_is_incomplete_and_the_key_follows_the_report_fields(monkeypatch):
    full = report().model_dump(mode="json")
    assert missing_report_fields(full) == []
    assert missing_report_fields(_older(full)) == [f"{role}.{name}" for role in ("candidate", "champion", "reference")
                                                   for name in GUARDS]
    assert missing_report_fields({**full, "win_rates": [{"judge": "oracle"}]})  # list items are checked too
    record = evaluate_module.EvalRecord(report=_older(full), report_path="r.json")
    assert not evaluation_complete(record)

    cfg = load_pipeline_config(TINY)
    model = ModelRecord(stage="dpo", path="/m", digest="c" * 16)
    inputs = {"cfg": cfg, "candidate": model, "champion": None, "base": model, "reward": None,
              "dataset": DatasetRecord(digest="d" * 16, out_dir="/d", files={}), "parent_run_id": None}
    key_fn = evaluate_task.cache_policy.cache_key_fn
    before = key_fn(None, inputs)
    assert before == key_fn(None, inputs)
    evaluation_version.cache_clear()
    schema = evaluate_module.EvalReport.model_json_schema()
    schema["properties"]["new_guard"] = {"type": "number"}  # a field added to the report
    monkeypatch.setattr(evaluate_module.EvalReport, "model_json_schema", classmethod(lambda cls, *a, **k: schema))
    try:
        assert key_fn(None, inputs) != before
    finally:
        monkeypatch.undo()
        evaluation_version.cache_clear()
    assert key_fn(None, inputs) == before


@pytest.mark.integration
def test_a_cached_evaluation_missing_a_guard_figure_is_a_miss_not_a_not_measured_failure(
        prefect_harness, tmp_path, monkeypatch):
    calls = []

    def fake_evaluate_models(*args, **kwargs):
        calls.append(1)
        return EvalOutput(report=report(), samples=[], scores={})

    monkeypatch.setattr(suite_module, "evaluate_models", fake_evaluate_models)  # the stage imports it when it runs
    prompts = tmp_path / "prompts-test.parquet"
    pd.DataFrame({"prompt_id": ["1"], "prompt": ["hello"], "is_chat": [False], "split": ["test"]}).to_parquet(prompts)
    cfg = load_pipeline_config(TINY, [f"pipeline.home={tmp_path / 'home'}", "gate.max_repeated_trigram_increase=0.1",
                                      "gate.max_fluency_drop=1.0"]).model_copy(update={"demo": None})
    model = ModelRecord(stage="dpo", path=str(tmp_path / "model"), digest="c" * 16)
    arguments = dict(cfg=cfg, candidate=model, champion=None, base=model, reward=None,
                     dataset=DatasetRecord(digest="d" * 16, out_dir=str(tmp_path), files={"prompts-test": str(prompts)}), parent_run_id=None)
    storage = tmp_path / "storage"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        first, cached = run_cached(evaluate_task, evaluation_complete, **arguments)
        assert not cached and len(calls) == 1 and gate_decision(cfg, first, has_champion=False)["passed"]
        [entry] = list((storage / "keys").iterdir())
        stored = json.loads((storage / entry.name).read_text())
        stored["data"]["report"] = _older(stored["data"]["report"])  # what an older version left under this key
        (storage / entry.name).write_text(json.dumps(stored))

        stale, cached = run_cached(evaluate_task, None, **arguments)  # without the check: the old record is used
        stale_gate = gate_decision(cfg, stale, has_champion=False)
        assert cached and not stale_gate["passed"] and "not measured" in " ".join(stale_gate["reasons"])

        again, cached = run_cached(evaluate_task, evaluation_complete, **arguments)
        assert not cached and len(calls) == 2  # a miss: evaluated again
        assert missing_report_fields(again.report) == []
        decision = gate_decision(cfg, again, has_champion=False)
        assert decision["passed"] and "not measured" not in " ".join(decision["reasons"]), decision["reasons"]
        hit, cached = run_cached(evaluate_task, evaluation_complete, **arguments)
        assert cached and len(calls) == 2 and missing_report_fields(hit.report) == []  # the fresh record replaced it
