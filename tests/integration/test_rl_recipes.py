"""PPO and GRPO on a tiny model raise a programmatic reward while reporting KL; resume is exact."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.config import GRPOConfig, PPOConfig
from alignment.recipes.grpo import GRPORecipe
from alignment.recipes.ppo import PPORecipe
from alignment.train import main as train_main
from tests.tiny_models import GOOD, NEUTRAL, make_tiny_model

pytestmark = pytest.mark.slow
GOOD_WORDS = set(GOOD)


def good_word_count(prompts, responses):
    """The reward: how many words of the response are in the GOOD list."""
    return [float(sum(w in GOOD_WORDS for w in r.split())) for r in responses]


REWARD_FN = f"{__name__}:good_word_count"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    model = make_tiny_model(root / "gpt2", "gpt2")
    prompts = [f"review the {a} {b}" for a in NEUTRAL[:8] for b in NEUTRAL[8:12]]
    table = pd.DataFrame({"prompt_id": [f"q{i}" for i in range(len(prompts))], "prompt": prompts,
                          "is_chat": False, "split": "train"})
    path = root / "prompts.parquet"
    table.to_parquet(path)
    return {"model": str(model), "prompts": str(path), "root": root}


def rl_config(assets, recipe: str, out: str, **over) -> dict:
    base = {
        "model": {"name_or_path": assets["model"]},
        "train_path": assets["prompts"],
        "output_dir": str(assets["root"] / out),
        "reward_fn": REWARD_FN,
        "generation": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 64},
        "kl": {"coef": 0.02},
        "batch_size": 16,
        "max_length": 64,
        "max_prompt_length": 16,
        "optim": {"lr": 3e-3, "schedule": "constant", "max_grad_norm": 1.0},
        "seed": 0,
    }
    base.update(over)
    return base


def read_metrics(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x and json.loads(x)["phase"] == "train"]


def learning_curve(records: list[dict]) -> tuple[float, float]:
    rewards = [r["reward/raw"] for r in records]
    k = max(2, len(rewards) // 4)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def test_ppo_raises_reward_with_kl_reported(assets):
    cfg = PPOConfig.model_validate(rl_config(assets, "ppo", "ppo", max_steps=24, rollout_batch_size=32,
                                             minibatch_size=16, update_epochs=2, vf_coef=0.5))
    summary = PPORecipe(cfg).run()
    records = read_metrics(assets["root"] / "ppo")
    start, end = learning_curve(records)
    assert summary["finished"] and len(records) == 24
    assert end > start + 1.0, (start, end)
    for key in ("kl", "kl_coef", "entropy", "loss/policy", "loss/value", "clipfrac", "approx_kl",
                "explained_variance", "response_length", "grad_norm", "lr", "tokens_per_s", "reward/shaped"):
        assert key in records[-1], key
    assert records[-1]["kl"] > 0.05  # the policy moved away from the reference, and it is measured
    assert (assets["root"] / "ppo" / "final" / "model.safetensors").exists()


def test_grpo_raises_reward_with_kl_reported(assets):
    # Two epochs of two minibatches: the rollout log-probs come from their own no-grad pass.
    cfg = GRPOConfig.model_validate(rl_config(assets, "grpo", "grpo", max_steps=16, rollout_batch_size=8,
                                              group_size=4, minibatch_size=16, update_epochs=2))
    GRPORecipe(cfg).run()
    records = read_metrics(assets["root"] / "grpo")
    start, end = learning_curve(records)
    assert end > start + 1.0, (start, end)
    assert all(r["kl"] >= 0 for r in records) and records[-1]["kl"] > 0.05
    assert records[-1]["clipfrac"] > 0 or records[-1]["approx_kl"] > 0  # later minibatches see a moved policy


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_resume_equals_uninterrupted_run(assets, recipe):
    """6 steps straight == 3 steps, stop (checkpoint), a fresh recipe object resumes for 3 more."""
    config_class, recipe_class = (PPOConfig, PPORecipe) if recipe == "ppo" else (GRPOConfig, GRPORecipe)
    over = dict(max_steps=6, rollout_batch_size=8, minibatch_size=16, update_epochs=1,
                kl={"coef": 0.05, "adaptive": True, "target": 0.5, "horizon": 50})
    if recipe == "grpo":
        over.update(group_size=4, minibatch_size=32, advantage="rloo")  # single-update path
    straight = config_class.model_validate(rl_config(assets, recipe, f"{recipe}-straight", **over))
    recipe_class(straight).run()
    split = config_class.model_validate(rl_config(assets, recipe, f"{recipe}-split", **over))
    recipe_class(split).run(until_step=3)
    summary = recipe_class(split).run()
    assert summary["resumed_from"].endswith("step-000003")
    a, b = read_metrics(assets["root"] / f"{recipe}-straight"), read_metrics(assets["root"] / f"{recipe}-split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert len({r["kl_coef"] for r in a}) > 1  # the adaptive coefficient moved, so its state matters
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "reward/raw", "kl", "kl_coef", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    w1 = load_file(str(assets["root"] / f"{recipe}-straight" / "final" / "model.safetensors"))
    w2 = load_file(str(assets["root"] / f"{recipe}-split" / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_train_cli_runs_grpo(assets, tmp_path):
    config = rl_config(assets, "grpo", "grpo-cli", max_steps=2, rollout_batch_size=4, group_size=2,
                       minibatch_size=8)
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train_main(["grpo", "--config", str(path), "--set", "kl.coef=0.1"]) == 0
    summary = json.loads((assets["root"] / "grpo-cli" / "summary.json").read_text())
    assert summary["recipe"] == "grpo" and summary["steps"] == 2


def test_ppo_lora_with_reward_model_and_separate_value(assets):
    """Reward from a reward-model folder, LoRA policy (reference = adapter disabled), separate value model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = assets["root"] / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(rm_dir)
    cfg = PPOConfig.model_validate(rl_config(
        assets, "ppo", "ppo-lora", max_steps=2, rollout_batch_size=8, minibatch_size=8, reward_fn=None,
        reward_model=str(rm_dir), value_model="separate",
        model={"name_or_path": assets["model"], "lora": {"r": 4, "alpha": 8}},
    ))
    recipe = PPORecipe(cfg)
    recipe.run()
    records = read_metrics(assets["root"] / "ppo-lora")
    # LoRA starts as the identity, so the adapter-disabled reference equals the policy at step 1.
    assert records[0]["kl"] == 0.0 and records[1]["kl"] != 0.0
    assert all(abs(r["reward/raw"]) > 0 and r["loss/value"] > 0 for r in records)
    ckpt = assets["root"] / "ppo-lora" / "checkpoints" / "step-000002"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "value.safetensors").exists()
    assert "score.weight" in load_file(str(ckpt / "value.safetensors"))
    assert (assets["root"] / "ppo-lora" / "final" / "merged" / "model.safetensors").exists()


def test_separate_critic_from_a_pooled_reward_model_is_warned_about(assets, caplog):
    """A sum-pooled reward model's score at a prefix is no value of it: the critic started from
    one is warned about (PPO fell short of the frontier with it); a last-pooled one is not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for pooling in ("sum", "last"):
        rm_dir = assets["root"] / f"rm-{pooling}"
        rm = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
        rm.config.reward_pooling = pooling
        rm.save_pretrained(rm_dir)
        AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(rm_dir)
        cfg = PPOConfig.model_validate(rl_config(assets, "ppo", f"ppo-{pooling}", max_steps=1, reward_fn=None,
                                                 reward_model=str(rm_dir), value_model="separate"))
        caplog.clear()
        with caplog.at_level("WARNING", logger="alignment.recipes.ppo"):
            PPORecipe(cfg).build_models()
        warned = [r for r in caplog.records if "sum-pooled reward model" in r.getMessage()]
        assert bool(warned) == (pooling == "sum")
