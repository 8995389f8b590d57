"""The one table of training stages and fine-tuning methods.

Each row says, for one stage (``sft``, ``reward``) or ``pipeline.method`` value (``dpo``,
``ipo``, ``simpo``, ``kto``, ``ppo``, ``grpo``): which section of the pipeline config holds its recipe
settings, which recipe of :mod:`alignment.recipes` runs it, the loss type the method sets, which
dataset files it trains on and whether it needs the reward model. Everything in ``tasks/`` and
``flows/`` that depends on the method reads this table; nothing else lists method names.

Adding a method: a row here, its recipe (``alignment/recipes``, its config class in
``alignment.config.RECIPE_CONFIGS``) and, when it has its own section, that section as a typed
field of :class:`tasks.config.PipelineConfig` (``tests/unit/test_methods.py`` checks every row's
section and recipe exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DataRole = Literal["pairs", "prompts", "demonstrations", "unpaired"]


@dataclass(frozen=True)
class Method:
    """One training stage or fine-tuning method."""

    name: str
    """The stage name and, for a policy update, the ``pipeline.method`` value."""
    section: str
    """The :class:`~tasks.config.PipelineConfig` section holding the recipe settings."""
    recipe: str
    """The recipe name in :mod:`alignment.recipes` (and :data:`alignment.config.RECIPE_CONFIGS`)."""
    data: DataRole
    """Dataset files it trains on: ``<data>-train``, evaluated on ``<data>-validation``."""
    loss_type: str | None = None
    """``loss_type`` the method sets on its recipe config; None: the section's own setting."""
    needs_reward_model: bool = False
    """Trains against the reward model (or the section's ``reward_fn``); the reward stage then
    runs even when ``reward.enabled`` is false."""
    implicit_reward: bool = False
    """The loss measures an implicit reward ``β · log π/π_ref`` against a reference model: the
    recipe gets a reference-log-prob cache and ``pipeline.dpo_reference`` picks the reference;
    evaluation uses the section's ``beta``."""
    backbone: Literal["policy", "reward"] = "policy"
    """Which configured model it starts from: the policy, or the reward model's backbone."""
    policy_update: bool = True
    """A ``pipeline.method`` value (the round's candidate), not a supporting stage."""

    def files(self, data: dict[str, str]) -> tuple[str, str | None]:
        """(train file, validation file or None) of this method from a dataset's file roles.

        Raises ValueError when the train file's role is missing."""
        train, validation = f"{self.data}-train", f"{self.data}-validation"
        if train not in data:
            raise ValueError(f"stage {self.name} needs the {train} file; the dataset has {sorted(data)}")
        return data[train], data.get(validation)


_ROWS = (
    Method("sft", section="sft", recipe="sft", data="demonstrations", policy_update=False),
    Method("reward", section="reward", recipe="reward", data="pairs", backbone="reward", policy_update=False),
    Method("dpo", section="dpo", recipe="dpo", data="pairs", implicit_reward=True),
    Method("ipo", section="dpo", recipe="dpo", data="pairs", loss_type="ipo", implicit_reward=True),
    Method("simpo", section="dpo", recipe="dpo", data="pairs", loss_type="simpo", implicit_reward=True),
    Method("kto", section="kto", recipe="kto", data="unpaired", implicit_reward=True),
    Method("ppo", section="ppo", recipe="ppo", data="prompts", needs_reward_model=True),
    Method("grpo", section="grpo", recipe="grpo", data="prompts", needs_reward_model=True),
)

STAGES: dict[str, Method] = {row.name: row for row in _ROWS}
"""Every training stage by name."""

METHOD_NAMES: tuple[str, ...] = tuple(row.name for row in _ROWS if row.policy_update)
"""The values ``pipeline.method`` accepts."""


def method(name: str) -> Method:
    """The row of a stage or method. Raises KeyError listing the known names."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown training stage {name!r}; expected one of {sorted(STAGES)}") from None


def label(name: str, configured_loss: str | None = None) -> str:
    """How summaries name a stage: the method, and the loss when the section's ``loss_type``
    (``configured_loss``) makes it another one (``dpo`` with ``loss_type: ipo`` trains IPO:
    ``dpo, loss ipo``)."""
    loss = method(name).loss_type or configured_loss
    return name if loss in (None, "sigmoid", name) else f"{name}, loss {loss}"
