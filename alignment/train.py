"""Command line entry: run one recipe in this process (or under ``accelerate launch``).

    python -m alignment.train dpo --config run.yaml [--set beta=0.2 --set optim.lr=1e-5]
    accelerate launch -m alignment.train dpo --config run.yaml

The YAML holds the recipe's config (:mod:`alignment.config`); each ``--set a.b=c`` overrides
one field (the value is parsed as YAML, so ``--set model.lora.r=8`` gives an int). The run
folder (``output_dir``) receives ``metrics.jsonl`` (one JSON record per line, flushed per
line so a parent process can tail it), ``checkpoints/``, ``final/`` and ``summary.json``.
Re-running the same command resumes from the newest checkpoint.

Exit codes: 0 success; 2 bad config or arguments (message names the field, or every
difference when resuming with a changed config); 1 a training error such as a non-finite
loss (the message names the step) or unreadable data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# Passive OpenMP waits: spinning threads slow torch down many-fold on a shared CPU (see flows/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from alignment.config import RECIPE_CONFIGS, ConfigError, TrainSettings, apply_overrides, validate_config
from alignment.recipes import get_recipe
from alignment.recipes.metrics_log import MetricsCallback


def load_config(recipe: str, path: str | Path | None, overrides: Sequence[str] = ()) -> TrainSettings:
    """The validated config of ``recipe`` from a YAML file plus ``--set`` overrides."""
    if recipe not in RECIPE_CONFIGS:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPE_CONFIGS)}")
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        data = loaded
    return validate_config(RECIPE_CONFIGS[recipe], apply_overrides(data, overrides), prefix=recipe)


def run(
    recipe: str, config: TrainSettings, callbacks: Sequence[MetricsCallback] = (), until_step: int | None = None
) -> dict[str, Any]:
    """Run one recipe through its whole lifecycle; returns its summary (also in ``summary.json``)."""
    return get_recipe(recipe)(config, callbacks=callbacks).run(until_step=until_step)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPE_CONFIGS))
    parser.add_argument("--config", help="YAML file with the recipe config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        config = load_config(args.recipe, args.config, args.overrides)
    except (ConfigError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(args.recipe, config)
    except ConfigError as err:  # includes ResumeConfigError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one clear line, then the traceback for debugging
        logging.getLogger("alignment.train").exception("training failed")
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"{args.recipe}: {summary['steps']} steps, finished={summary['finished']}, output_dir={config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
