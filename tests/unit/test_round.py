"""The round record (tasks/round.py) and the demo's crash-resume settings."""

from __future__ import annotations

import json

import pytest

from tasks.config import load_pipeline_config
from tasks.round import RoundLog


def test_round_record_persists_each_step_and_tells_a_dead_round_from_a_failed_one(tmp_path):
    log = RoundLog(tmp_path)
    record, previous = log.begin("p", flow_run_id="f1", mlflow_run_id="m1")
    assert previous is None and record.state == "started"
    log.advance(record, "ingested", batch_id="b1")
    log.advance(record, "built", dataset_digest="d1")
    on_disk = json.loads((tmp_path / "round.json").read_text())
    assert on_disk["state"] == "built" and on_disk["batch_id"] == "b1" and on_disk["dataset_digest"] == "d1"
    assert [h["state"] for h in on_disk["history"]] == ["started", "ingested", "built"]
    # the process dies here; the next run reads where it stopped
    second, dead = log.begin("p", flow_run_id="f2")
    assert dead.interrupted and dead.state == "built" and dead.flow_run_id == "f1"
    assert second.retry_of.startswith(dead.round_id) and "died at built" in second.retry_of
    log.advance(second, "failed", error="boom")
    third, failed = log.begin("p")
    assert not failed.interrupted and not failed.ended and "failed at failed" in third.retry_of
    log.advance(third, "promoted")
    fourth, ended = log.begin("p")
    assert ended.ended and not ended.settled and fourth.retry_of is None
    assert [json.loads(line)["state"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == \
        ["failed", "promoted"]
    with pytest.raises(ValueError, match="unknown round state"):
        log.advance(fourth, "half-done")


def test_an_unreadable_record_starts_afresh(tmp_path):
    (tmp_path / "round.json").write_text('{"round_id": "x", "pipel')  # torn by a crash mid-write
    record, previous = RoundLog(tmp_path).begin("p")
    assert previous is None and record.state == "started"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_demo_checkpoints_its_training_so_a_crash_resumes_it():
    cfg = load_pipeline_config(None, [])
    assert cfg.dpo.save_every and cfg.reward.save_every


def _ended(log, state, batch, version=None):
    record, _ = log.begin("p")
    log.advance(record, "ingested", batch_id=batch)
    log.advance(record, state, policy_version=version)


def test_refused_rounds_since_the_champion_was_promoted(tmp_path):
    log = RoundLog(tmp_path)
    assert log.refused_since_promotion(None) == [] and log.refused_since_promotion("1") == []
    _ended(log, "rejected", "b0", "1")  # the base model is the champion until a round promotes
    assert log.refused_since_promotion(None) == ["b0"] and log.refused_since_promotion("1") == []
    _ended(log, "promoted", "b1", "2")
    assert log.refused_since_promotion("2") == []
    _ended(log, "rejected", "b2", "3")
    _ended(log, "failed", "b3")  # redone by the next round with the same batch: not a verdict
    _ended(log, "rejected", "b3", "4")
    _ended(log, "unchanged", None)
    assert log.refused_since_promotion("2") == ["b2", "b3"]
    # the alias moved by hand (promote, rollback): that feedback was sampled from another model
    assert log.refused_since_promotion("1") == [] and log.refused_since_promotion(None) == []
    with log.history_path.open("a") as f:
        f.write('{"round_id": "torn", "pipel\n')  # a line cut by a full disk is skipped
    _ended(log, "promoted", "b4", "5")
    assert log.refused_since_promotion("5") == []


def test_a_redo_builds_from_the_batches_its_first_attempt_chose(tmp_path):
    """The first attempt records its replayed batches at ``ingested``; it may then move the champion
    alias and die, so the redo takes the recorded list instead of asking the registry again."""
    from tasks.stages.data import data_dir, replayed_batches

    cfg = load_pipeline_config(None, [f"pipeline.home={tmp_path}", "preferences.replay_refused=true"])
    log = RoundLog(data_dir(cfg))
    first, _ = log.begin("demo")
    log.advance(first, "ingested", batch_id="b3", replayed_batches=["b2"])
    log.advance(first, "registered", policy_version="4")  # ...the alias moves, and the process dies
    redo, dead = log.begin("demo")
    assert dead.interrupted and redo.replayed_batches == ["b2"]
    assert replayed_batches(cfg) == ["b2"]  # read from the record: no registry call
    off = load_pipeline_config(None, [f"pipeline.home={tmp_path}"])
    assert replayed_batches(off) == []
