"""The policy pyfunc's input and params handling, its signature, the serve command and model cards."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tasks.config import load_pipeline_config
from tasks.records import ModelRecord
from tasks.serving import POLICY_MODEL_FILE, serve_command
from tasks.serving.card import model_card, policy_card, reward_card
from tasks.serving.signature import POLICY_PARAMS, policy_input_example, policy_signature
from tests.integration.pipeline_helpers import TINY
from tests.tiny_models import make_tiny_model

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def policy_model():
    spec = importlib.util.spec_from_file_location("policy_model_under_test", POLICY_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompts_of_accepts_plain_and_chat_prompts_in_every_shape(policy_model):
    prompts_of = policy_model.prompts_of
    assert prompts_of("a") == ["a"]
    assert prompts_of(["a", CHAT, json.dumps(CHAT)]) == ["a", CHAT, CHAT]  # stored chat JSON text is decoded
    assert prompts_of({"prompt": ["a", "b"]}) == ["a", "b"]
    assert prompts_of({"messages": [CHAT]}) == [CHAT]
    assert prompts_of(pd.DataFrame({0: ["a", CHAT]})) == ["a", CHAT]
    assert prompts_of(pd.DataFrame([CHAT])) == [CHAT]  # a message list spread over columns by pandas
    assert prompts_of(["[not json"]) == ["[not json"]
    with pytest.raises(MlflowException, match="got int"):
        prompts_of([3])
    with pytest.raises(MlflowException, match="no prompt"):
        prompts_of(pd.DataFrame({0: [None]}))


def test_generation_params_defaults_and_range_errors(policy_model):
    assert policy_model.PARAMS == POLICY_PARAMS  # the copied file and the signature agree
    assert policy_model.generation_params(None) == POLICY_PARAMS
    assert policy_model.generation_params({"temperature": 0.7})["temperature"] == 0.7
    for bad, name in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                      ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"beam": 2}, "unknown params")):
        with pytest.raises(MlflowException, match=name):
            policy_model.generation_params(bad)


def test_signature_and_input_example(tmp_path):
    sig = policy_signature()
    assert {p.name: p.default for p in sig.params.params} == POLICY_PARAMS
    assert sig.outputs.input_types()[0].name == "string"
    folder = make_tiny_model(tmp_path / "m", "gpt2")  # its tokenizer has a chat template
    prompts, params = policy_input_example(folder)
    assert isinstance(prompts[0], str) and prompts[1][0]["role"] == "user" and params == {"max_new_tokens": 8}
    (folder / "adapter_config.json").write_text("{}")
    assert policy_input_example(folder) is None  # an adapter's base would load from the hub


def test_serve_command_puts_the_environment_on_path_and_masks_credentials():
    cmd = serve_command("https://bob:s3cret@mlflow.example/", "demo-policy", port=5005)
    assert "s3cret" not in cmd and "bob:***@" in cmd
    assert cmd.startswith("PATH=") and "--env-manager local" in cmd and "models:/demo-policy@champion" in cmd
    assert "--port 5005" in cmd


def test_model_cards_say_what_a_version_is():
    cfg = load_pipeline_config(TINY, ["pipeline.method=kto"])
    candidate = ModelRecord(stage="kto", path="/x/final", digest="d", base="/models/base",
                            summary={"steps": 12, "data": {"train": {"examples": 96}, "eval": {"examples": 20}}})
    decision = {"eval_tags": {"alignflow.eval.kl": 1.23456, "alignflow.eval.reward_mean": 0.5}}
    card = policy_card(cfg, candidate, "3", "abc123", decision, False,
                       ["Not promoted: 1 of 6 rules failed (win_rate).", "Win rate 0.41 (0.30-0.52)."])
    assert card.startswith("**tiny-policy v3**")
    for text in ("`/models/base`", "digest `abc123`", "20 eval, 96 train examples", "Method: kto, 12 steps",
                 "beta=0.1", "lr=0.001", "kl=1.235", "Gate: failed — Not promoted", "  - Win rate 0.41"):
        assert text in card, (text, card)
    reward = ModelRecord(stage="reward", path="/x/rm", digest="r", base="/models/base",
                         summary={"metrics": {"eval/accuracy": 0.8125}})
    assert "accuracy=0.8125" in reward_card(cfg, reward, "2", "abc123", "3")
    assert "Settings: defaults" in model_card(title="t", base_model="", data_digest="d", data="?", method="m",
                                              settings={}, evaluation={}, gate="passed")


def test_time_tags_are_iso_8601_and_old_epoch_tags_still_order():
    from datetime import datetime

    from tasks.tracking.registry import tag_time, utc_timestamp

    now = utc_timestamp()
    parsed = datetime.fromisoformat(now)
    assert parsed.utcoffset().total_seconds() == 0 and "T" in now
    assert tag_time(now) == pytest.approx(parsed.timestamp())
    assert tag_time("1700000000.5") == 1700000000.5  # what versions before ISO tags hold
    assert sorted(["2026-01-02T00:00:00+00:00", "1700000000.0"], key=tag_time)[0] == "1700000000.0"


def test_end_of_run_hints_give_the_serve_command_once_there_is_a_champion():
    from tasks.stages.register import RegistryRecord
    from tasks.stages.summary import PipelineSummary, ui_hints

    summary = PipelineSummary(pipeline="demo", home="/h", mlflow_run_id="r", experiment_id="1",
                              tracking_uri="sqlite:////h/mlflow.db")
    assert not any(h.startswith("Serve it") for h in ui_hints(summary))
    summary.registry = RegistryRecord(policy_model="demo-policy", policy_version="2", promoted=True,
                                      champion_version="2", previous_champion="1")
    (serve,) = [h for h in ui_hints(summary) if h.startswith("Serve it")]
    assert "models:/demo-policy@champion" in serve and "MLFLOW_TRACKING_URI=sqlite:////h/mlflow.db" in serve
    assert "--env-manager local" in serve


def test_end_of_run_ui_commands_run_from_a_shell_without_the_environment_on_path(monkeypatch):
    """A fresh clone's `make run` installs into .venv, which is not on the user's PATH: the
    printed UI commands name this environment's own mlflow and prefect executables."""
    import shlex

    from tasks.stages.summary import PipelineSummary, ui_hints

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)  # the test session's Prefect harness sets it
    summary = PipelineSummary(pipeline="demo", home="/h", mlflow_run_id="r", experiment_id="1",
                              tracking_uri="sqlite:////h/mlflow.db")
    mlflow_hint, prefect_hint = ui_hints(summary)[:2]
    mlflow_cmd = shlex.split(mlflow_hint.split("MLflow UI:", 1)[1].split("   then")[0])
    prefect_cmd = shlex.split(prefect_hint.split("Prefect UI:", 1)[1].split("   then")[0])
    assert mlflow_cmd[1:3] == ["ui", "--backend-store-uri"] and Path(mlflow_cmd[0]).is_absolute()
    assert Path(mlflow_cmd[0]).is_file() and os.access(mlflow_cmd[0], os.X_OK)
    assert prefect_cmd[0] == "PREFECT_HOME=/h/prefect" and prefect_cmd[2:] == ["server", "start"]
    assert Path(prefect_cmd[1]).is_file() and os.access(prefect_cmd[1], os.X_OK)
