"""Training recipes: one class per algorithm on the lifecycle of :class:`~alignment.recipes.base.Recipe`,
in one of two sibling families: :class:`~alignment.recipes.supervised.SupervisedRecipe` (a loss per
micro-batch: SFT, reward model, DPO family, KTO) or :class:`~alignment.recipes.rl_base.RLRecipe`
(rollout + minibatch updates: PPO, GRPO).

``get_recipe("dpo")`` returns the class; modules are imported on first use, so a recipe whose
optional dependencies are missing does not break the others.
"""

from __future__ import annotations

from importlib import import_module

RECIPES: dict[str, str] = {
    "sft": "alignment.recipes.sft:SFTRecipe",
    "reward": "alignment.recipes.reward:RewardRecipe",
    "dpo": "alignment.recipes.dpo:DPORecipe",
    "kto": "alignment.recipes.kto:KTORecipe",
    "ppo": "alignment.recipes.ppo:PPORecipe",
    "grpo": "alignment.recipes.grpo:GRPORecipe",
}
"""Recipe name → ``module:Class``."""


def get_recipe(name: str):
    """The recipe class registered as ``name``. Raises KeyError listing the known names."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(import_module(module), cls)
