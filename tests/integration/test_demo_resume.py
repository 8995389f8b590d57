"""``alignflow demo`` after a round that did not end: the next demo run finishes that round with the
feedback that landed for it, instead of simulating another batch and leaving that feedback unused.
Real Prefect engine (test harness), embedded MLflow store, the tiny config; the round fails the way
a stalled stage does (its training runs past ``pipeline.stage_timeout_s`` and is stopped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.demo import closed_loop_demo, unfinished_round
from tasks import tracking
from tasks.config import load_pipeline_config
from tasks.data.landing import CONSUMED, ledger_for
from tasks.round import ENDS, RoundLog
from tasks.stages.data import data_dir, ingest_settings
from tests.integration.pipeline_helpers import TINY, overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _batches(landing: Path) -> set[str]:
    return {m.group(1) for p in landing.iterdir() if (m := re.match(r"(round\d+-[0-9a-f]+)-", p.name))}


def test_a_demo_round_that_failed_is_finished_with_its_own_feedback_by_the_next_demo_run(
        prefect_harness, demo_cache, tmp_path, clean_mlflow_env):
    home = tmp_path / "home"
    cfg = load_pipeline_config(TINY, overrides(home, demo_cache))
    landing = Path(ingest_settings(cfg).landing_dir)
    with pytest.raises(Exception, match="ran past 1 s"):
        closed_loop_demo(config=TINY, overrides=overrides(home, demo_cache, "pipeline.stage_timeout_s=1"), rounds=1)
    first = _batches(landing)
    assert len(first) == 1 and next(iter(first)).startswith("round000-")
    assert RoundLog(data_dir(cfg)).load().state not in ENDS

    rows = closed_loop_demo(config=TINY, overrides=overrides(home, demo_cache), rounds=1)

    assert _batches(landing) == first  # no second batch: round 0 ran again on its own feedback
    assert [r["round"] for r in rows] == [0] and rows[0]["rows"] > 0 and rows[0]["promoted"]
    assert RoundLog(data_dir(cfg)).load().state in ENDS
    ledger = ledger_for(ingest_settings(cfg), data_dir(cfg)).latest().values()
    landed = {str(p) for p in landing.iterdir() if p.is_file()}
    assert {e["path"] for e in ledger if e["state"] == CONSUMED} == landed  # every landed file consumed once
    assert unfinished_round(cfg, landing) is None  # the next demo round simulates a new batch
    # the champion carries the base model's oracle on its own evaluation's prompts: its gain is read against that
    tags = tracking.version_tags(tracking.policy_model_name(cfg.pipeline.name), rows[0]["champion"])
    assert float(tags["alignflow.eval.base_oracle_mean"]) == pytest.approx(rows[0]["base oracle"])
    assert rows[0]["gain"] == pytest.approx(rows[0]["oracle"] - rows[0]["base oracle"])
