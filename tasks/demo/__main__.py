"""Build (or load from cache) the demo base model and show what it writes.

    python -m tasks.demo [--cache-dir DIR] [--samples 10] [--seed 0] [--set pretrain.steps=400 ...]

Prints the build record (digest, held-out perplexity, build time), then continuations of
held-out test prompts sampled with the simulator's settings, each with its VADER score, their
mean, and the share of their words that are real words (found in the corpus).
"""

from __future__ import annotations

import argparse
import json

import yaml

from alignment.config import validate_config
from tasks.demo.settings import DemoSettings


def _apply(data: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="demo cache (default $ALIGNFLOW_HOME/cache/demo)")
    parser.add_argument("--samples", type=int, default=10, help="test prompts to continue")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo setting")
    args = parser.parse_args(argv)
    data: dict = {"cache_dir": args.cache_dir}
    for assignment in args.set:
        _apply(data, assignment)
    settings = validate_config(DemoSettings, data, prefix="demo")

    from alignment.generation import generate
    from tasks.demo.base_model import build_base_model
    from tasks.demo.corpus import corpus_words, demo_cache_dir, load_corpus, real_word_share
    from tasks.demo.oracle import sentiment
    from tasks.demo.prompts import demo_prompts
    from tasks.demo.simulator import generation_settings, load_policy

    info = build_base_model(settings)
    print(json.dumps(info.__dict__, indent=2))
    prompts = demo_prompts(settings, info.path)
    test = prompts[prompts["split"] == "test"]["prompt"].tolist()[: args.samples]
    model, tokenizer = load_policy(info.path)
    texts = generate(model, tokenizer, test, generation_settings(settings.simulator), args.seed).texts
    scores = sentiment(texts)
    for prompt, text, score in zip(test, texts, scores, strict=True):
        print(f"{score:+.2f} | {prompt} ||{text}")
    print(f"mean VADER compound of {len(texts)} continuations: {scores.mean():+.3f}")
    words = corpus_words(load_corpus(settings.corpus, demo_cache_dir(settings)))
    print(f"share of their words found in the corpus: {real_word_share(texts, words):.3f}")


if __name__ == "__main__":
    main()
