"""Human evaluation round trip under the real Prefect engine and MLflow store: a tiny round makes
a champion, a second policy version is registered as challenger, ``alignflow eval-export``
writes the blinded sheet, the demo's simulated annotators fill it, the filled sheet lands, and
the next round (``gate.judge: human``) records the human win rate and promotes the version
people preferred, while its own candidate waits for people."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from flows.cli import main as cli_main
from flows.pipeline import alignment_pipeline
from tasks import tracking
from tasks.demo.human_sheet import fill_sheet
from tasks.demo.settings import SimulatorSettings
from tasks.evaluation.human import SHEET_COLUMNS, load_keys
from tests.integration.pipeline_helpers import TINY, child_runs, overrides, use_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _perturbed(folder, out):
    """A copy of a model folder with noise added to every weight (tokenizer files unchanged)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(folder, out)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.std().nan_to_num(0.02) * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def test_sheet_out_people_in_win_rate_recorded_and_gate_promotes(prefect_harness, demo_cache, tmp_path,
                                                                   clean_mlflow_env):
    home = tmp_path / "home"
    first = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache))
    assert first["status"] == "promoted"
    client = use_store(home)
    # a second version: the champion with perturbed weights (same tokenizer), registered as challenger
    run = client.create_run(client.get_experiment_by_name("tiny").experiment_id)
    v2 = tracking.log_policy(run.info.run_id, _perturbed(tracking.download_model("tiny-policy", "1", tmp_path / "v1"),
                                                         tmp_path / "v2"), "tiny", {})
    client.set_terminated(run.info.run_id)
    tracking.set_alias("tiny-policy", tracking.CHALLENGER, v2)
    assert tracking.alias_version("tiny-policy", tracking.CHAMPION) == "1" and v2 == "2"

    common = ["--config", TINY, "--set", f"pipeline.home={home}", "--set", f"demo.cache_dir={demo_cache}"]
    assert cli_main(["eval-export", *common, "--num-prompts", "12"]) == 0
    (key,) = load_keys(home).values()
    assert (key.first_version, key.second_version, key.first_ref) == ("1", "2", "champion")
    sheet = pd.read_csv(home / "human-eval" / key.sheet_id / "sheet.csv", keep_default_na=False)
    items = 12 - sum(key.left_out.values())  # prompts both versions answer alike are left out
    assert len(sheet) == items >= 4 and (sheet["choice"] == "").all()
    assert list(sheet.columns) == SHEET_COLUMNS  # blinded: nothing on the sheet names a version
    filled = fill_sheet(sheet, SimulatorSettings(), seed=0)
    filled.to_csv(home / "landing" / "tiny" / f"human-eval-{key.sheet_id}.csv", index=False)

    second = alignment_pipeline(config=TINY, overrides=overrides(
        home, demo_cache, "gate.judge=human", "preferences.annotator_min_agreement=0.0",
        "preferences.recent_batches=null", "reward.enabled=false"))
    use_store(home)
    # the human win rate, computed independently from the filled sheet and the key
    per_item: dict[str, list[float]] = {}
    for row in filled.to_dict("records"):
        second_is_a = key.a_is[row["conversation_id"]] == "second"
        per_item.setdefault(row["conversation_id"], []).append(
            0.5 if row["choice"] == "tie" else float((row["choice"] == "a") == second_is_a))
    expected = sum(sum(v) / len(v) for v in per_item.values()) / len(per_item)
    tags = client.get_model_version("tiny-policy", "2").tags
    assert float(tags["alignflow.human.win_rate"]) == pytest.approx(expected, abs=1e-4)
    assert tags["alignflow.human.vs_version"] == "1" and tags["alignflow.human.items"] == str(items)
    assert int(tags["alignflow.human.votes"]) == len(filled)
    assert float(tags["alignflow.human.ci_low"]) <= expected <= float(tags["alignflow.human.ci_high"])
    assert client.get_model_version("tiny-policy", "1").tags["alignflow.human.compared_with"].startswith("v2: ")
    runs = child_runs(client, second["mlflow_run_id"])
    human = runs["human-eval"][0]
    assert human.data.metrics["human/win_rate"] == pytest.approx(expected, abs=1e-6)
    assert human.data.metrics["human/items"] == items
    # tiny's gate.min_win_rate_lower_bound is 0 and the agreement floor was set to 0: people promote v2
    assert tags["alignflow.human.gate"] == "passed"
    # the round's own candidate (v3) was registered but waits for people
    v3 = client.get_model_version("tiny-policy", "3")
    assert v3.tags["alignflow.gate"] == "failed" and "gate.judge: human" in v3.tags["alignflow.gate_reasons"]
    assert tracking.alias_version("tiny-policy", tracking.CHAMPION) == "2"
    assert tracking.alias_version("tiny-policy", tracking.CHALLENGER) == "3"
    assert any(s["stage"] == "human evaluation" for s in second["stages"])
    assert mlflow.get_tracking_uri().endswith("mlflow.db")
