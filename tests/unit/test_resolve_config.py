"""The flow's config argument: a given PipelineConfig is kept, with the overrides applied."""

from __future__ import annotations

import pytest

from alignment.config import ConfigError
from flows.pipeline import resolve_config
from tasks.config import DEMO_CONFIG, load_pipeline_config


def test_a_given_config_keeps_its_settings_and_takes_the_overrides():
    given = load_pipeline_config(DEMO_CONFIG.parent / "tiny.yaml")
    resolved = resolve_config(given, ["dpo.beta=0.5", "pipeline.seed=7"])
    assert resolved.pipeline.name == given.pipeline.name == "tiny"  # not the demo config
    assert (resolved.dpo.beta, resolved.pipeline.seed) == (0.5, 7)
    unchanged = {k: v for k, v in resolved.model_dump().items() if k not in ("dpo", "pipeline")}
    assert unchanged == {k: v for k, v in given.model_dump().items() if k not in ("dpo", "pipeline")}
    assert given.dpo.beta != 0.5  # the given object is not modified
    assert resolve_config(given, None) is given


def test_overrides_of_a_given_config_are_validated():
    with pytest.raises(ConfigError, match="dpo.beta"):
        resolve_config(load_pipeline_config(None), ["dpo.beta=-1"])


def test_a_path_or_none_loads_the_file():
    assert resolve_config(None, ["pipeline.seed=3"]).pipeline.seed == 3
    assert resolve_config(str(DEMO_CONFIG.parent / "tiny.yaml"), []).pipeline.name == "tiny"
