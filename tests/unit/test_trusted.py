"""Deployment runs cannot set code-executing settings through their parameters (issue 14):
``trust_remote_code``, ``reward_fn``, ``accelerate_config``, model paths outside
``pipeline.allowed_models``, or another config file. The operator's own settings still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import ConfigError
from tasks.trusted import check_run_parameters

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
DEPLOYED = {"config": TINY, "overrides": []}


@pytest.mark.parametrize("override, field", [
    ("ppo.reward_fn=os:system", "ppo.reward_fn"),
    ("grpo.reward_fn=evil.module:score", "grpo.reward_fn"),
    ("pipeline.accelerate_config=/tmp/evil.yaml", "pipeline.accelerate_config"),
    ("model.policy={name_or_path: gpt2, trust_remote_code: true}", "model.policy.trust_remote_code"),
    ("model.reward.name_or_path=/tmp/planted-model", "model.reward.name_or_path"),
    ("model.policy={name_or_path: someone/remote-code-model}", "model.policy.name_or_path"),
    ("pipeline.allowed_models=['*']", "pipeline.allowed_models"),
    ("data.landing_dir=/etc", "data.landing_dir"),
    ("data.sources=[{path: /root/.ssh/id_rsa}]", "data.sources"),
    ("pipeline.home=/opt/alignflow", "pipeline.home"),
])
def test_a_deployment_run_cannot_override_code_executing_settings(override, field):
    with pytest.raises(ConfigError) as err:
        check_run_parameters(TINY, [override], DEPLOYED)
    assert field in str(err.value) and "config file" in str(err.value)


def test_a_deployment_run_cannot_swap_the_config_file(tmp_path):
    other = tmp_path / "mine.yaml"
    other.write_text("ppo: {reward_fn: 'os:system'}\n")
    with pytest.raises(ConfigError, match=r"^config: .*tiny\.yaml"):
        check_run_parameters(str(other), [], DEPLOYED)


def test_harmless_overrides_and_the_operators_own_settings_pass():
    check_run_parameters(TINY, ["dpo.beta=0.2", "evaluation.generation.max_new_tokens=8"], DEPLOYED)
    # what the operator deployed with (alignflow serve --set ...) is trusted and may be repeated
    deployed = {"config": TINY, "overrides": ["pipeline.accelerate_config=infra/accelerate/ddp.yaml"]}
    check_run_parameters(TINY, ["pipeline.accelerate_config=infra/accelerate/ddp.yaml", "dpo.beta=0.3"], deployed)
    # model paths the config file allows
    allowing = {"config": TINY, "overrides": ["pipeline.allowed_models=['Qwen/*']"]}
    check_run_parameters(TINY, ["model.policy.name_or_path=Qwen/Qwen2.5-0.5B"], allowing)
    with pytest.raises(ConfigError, match="model.policy.name_or_path"):
        check_run_parameters(TINY, ["model.policy.name_or_path=evil/model"], allowing)


def test_runs_outside_a_deployment_are_the_operators_and_unchecked():
    check_run_parameters(TINY, ["ppo.reward_fn=my_rewards:score"], None)
