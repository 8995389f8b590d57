"""Human evaluation round trip: a blinded side-by-side sheet out, people's verdicts back in.

Out (``alignflow eval-export``, :func:`export_sheet`): two versions of ``<pipeline>-policy``
(aliases or numbers; default ``champion`` vs ``challenger``) each answer the same held-out
prompts (the newest preference build's test split, or a file), one seeded sample per prompt
with the ``evaluation.generation`` settings. Every item shows the two answers as
``response_a``/``response_b`` in a random order and the items come in a random order, so
nothing on the sheet says which model wrote what; prompts the two answer identically (or one
leaves blank) are left out and counted in the key. The sheet (``sheet.csv`` and ``sheet.jsonl``)
holds ``conversation_id`` (the item id), ``prompt``, ``response_a``, ``response_b``, an empty
``choice`` (people write ``a``, ``b`` or ``tie``), an empty ``annotator_id`` and ``source``
(``human-eval:<sheet id>``): a filled sheet is ordinary pairwise feedback. The key (which
version is ``a`` in each item) is written only to ``<home>/human-eval/<sheet id>/key.json``.

Back: ``alignflow ingest FILLED`` checks a filled sheet like any feedback file; put in the
landing folder, the next round ingests it (its votes also train, as pairwise feedback) and
:func:`human_evaluation_step` unblinds every sheet whose key is in the home: the win rate of the
second version over the first (ties half) with a Wilson interval whose units are items (the
votes of several people on one item are averaged first), the number of votes and annotators,
and their agreement (share of agreeing vote pairs on items labelled more than once). It logs
them to a ``human-eval`` child run and tags both versions (``alignflow.human.*`` on the second,
``alignflow.human.compared_with`` on the first).

The gate's judge (``gate.judge: human``): the round's own candidate has no human verdict yet, so
the round registers it as ``challenger`` without promoting it; once a sheet comparing the
current champion (first) with a later version (second) comes back, :func:`human_verdict`
promotes the second version when the interval's lower bound clears
``gate.min_win_rate_lower_bound`` and the people agree with each other at least
``preferences.annotator_min_agreement`` (when any item was labelled twice; otherwise the
verdict says the agreement was not measured).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from tasks.evaluation.metrics import WinRate, win_rate

SOURCE_PREFIX = "human-eval:"
SHEET_COLUMNS = ["conversation_id", "prompt", "response_a", "response_b", "choice", "annotator_id", "source"]
TAG = "alignflow.human."


class SheetKey(BaseModel):
    """What unblinds a sheet (kept in the home, never on the sheet)."""

    sheet_id: str
    model: str
    """Registered model name (``<pipeline>-policy``)."""
    first_version: str
    second_version: str
    first_ref: str
    """How the first version was asked for (alias or number)."""
    second_ref: str
    created_at: str
    """UTC, ISO 8601."""
    seed: int
    a_is: dict[str, Literal["first", "second"]]
    """Item id -> which version's answer the sheet shows as ``response_a``."""
    left_out: dict[str, int] = {}
    """Prompts not on the sheet: ``identical`` answers (nothing to choose; a pairwise row needs
    two different responses) and ``empty`` ones (feedback files may not hold blank responses)."""


class HumanResult(BaseModel):
    """People's verdict on one sheet: the second version against the first."""

    sheet_id: str
    model: str
    first_version: str
    second_version: str
    win_rate: WinRate
    """Second over first; ``units`` are items."""
    votes: int
    annotators: int
    agreement: float | None
    """Share of agreeing vote pairs on items with two or more votes (None: no such item)."""

    def tags(self) -> dict[str, str]:
        """Version tags for the second version."""
        w = self.win_rate
        return {f"{TAG}sheet": self.sheet_id, f"{TAG}vs_version": self.first_version,
                f"{TAG}win_rate": f"{w.rate:.4f}", f"{TAG}ci_low": f"{w.lower:.4f}", f"{TAG}ci_high": f"{w.upper:.4f}",
                f"{TAG}items": str(w.units), f"{TAG}votes": str(self.votes), f"{TAG}annotators": str(self.annotators),
                f"{TAG}agreement": "not measured" if self.agreement is None else f"{self.agreement:.4f}"}


def sheets_dir(home: str | Path) -> Path:
    """Where keys (and, by default, sheets) live: ``<home>/human-eval``."""
    return Path(home) / "human-eval"


def load_keys(home: str | Path) -> dict[str, SheetKey]:
    """Every sheet key in the home, by sheet id."""
    out = {}
    for path in sorted(sheets_dir(home).glob("*/key.json")):
        key = SheetKey.model_validate_json(path.read_text())
        out[key.sheet_id] = key
    return out


# ----------------------------------------------------------------------------- export
def _same(x: str, y: str) -> bool:
    return " ".join(x.split()) == " ".join(y.split())


def blinded_items(prompts: list, first: list[str], second: list[str], seed: int,
                  sheet_id: str) -> tuple[pd.DataFrame, dict[str, str], dict[str, int]]:
    """The sheet rows (random sides, random order), the key's ``a_is`` map and the counts of
    prompts left out (``identical`` or ``empty`` answers, see :class:`SheetKey`).

    ``prompts`` are strings or message lists (written as their JSON text, the stored form)."""
    if not (len(prompts) == len(first) == len(second)) or not prompts:
        raise ValueError(f"need the same positive number of prompts and answers, got {len(prompts)}, "
                         f"{len(first)}, {len(second)}")
    rng = np.random.default_rng(seed)
    first_is_a = rng.random(len(prompts)) < 0.5
    order = rng.permutation(len(prompts))
    empty = {i for i in range(len(prompts)) if not first[i].strip() or not second[i].strip()}
    identical = {i for i in range(len(prompts)) if i not in empty and _same(first[i], second[i])}
    order = [i for i in order if i not in empty and i not in identical]
    rows, a_is = [], {}
    for rank, i in enumerate(order):
        item = f"{sheet_id}-{rank + 1:04d}"
        a, b = (first[i], second[i]) if first_is_a[i] else (second[i], first[i])
        prompt = prompts[i] if isinstance(prompts[i], str) else json.dumps(prompts[i], ensure_ascii=False)
        rows.append({"conversation_id": item, "prompt": prompt, "response_a": a, "response_b": b, "choice": "",
                     "annotator_id": "", "source": SOURCE_PREFIX + sheet_id})
        a_is[item] = "first" if first_is_a[i] else "second"
    return pd.DataFrame(rows, columns=SHEET_COLUMNS), a_is, {"identical": len(identical), "empty": len(empty)}


def write_sheet(frame: pd.DataFrame, key: SheetKey, out_dir: Path, home: str | Path) -> tuple[Path, Path, Path]:
    """``sheet.csv`` and ``sheet.jsonl`` into ``out_dir``; ``key.json`` into the home's sheet folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = out_dir / "sheet.csv", out_dir / "sheet.jsonl"
    frame.to_csv(csv_path, index=False)
    jsonl_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict("records")))
    key_dir = sheets_dir(home) / key.sheet_id
    key_dir.mkdir(parents=True, exist_ok=True)
    key_path = key_dir / "key.json"
    key_path.write_text(key.model_dump_json(indent=2))
    return csv_path, jsonl_path, key_path


def heldout_prompts(cfg) -> list:
    """Test-split prompts of the newest preference build of the pipeline (validation when it has none).

    Raises FileNotFoundError when no build has held-out prompts (run the pipeline once, or pass a file)."""
    from alignment.batching import decode_prompt
    from tasks.stages.data import data_dir

    builds = sorted((data_dir(cfg) / "preferences").glob("*/prompts-*.parquet"), key=lambda p: p.stat().st_mtime)
    for split in ("test", "validation"):
        files = [p for p in builds if p.name == f"prompts-{split}.parquet"]
        if files:
            rows = pd.read_parquet(files[-1]).to_dict("records")
            if rows:
                return [decode_prompt(r) for r in rows]
    raise FileNotFoundError(f"no held-out prompts under {data_dir(cfg) / 'preferences'}: run the pipeline once "
                            "or pass --prompts FILE")


def read_prompts(path: str | Path) -> list:
    """Prompts from a Parquet, JSONL or CSV file with a ``prompt`` column (``is_chat`` optional).

    Raises ValueError naming the file when it has no ``prompt`` column or no rows."""
    from alignment.batching import decode_prompt

    path = Path(path)
    readers = {".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True), ".csv": pd.read_csv}
    if path.suffix not in readers:
        raise ValueError(f"{path}: prompts must be a .parquet, .jsonl or .csv file")
    frame = readers[path.suffix](path)
    if "prompt" not in frame.columns or frame.empty:
        raise ValueError(f"{path}: needs a 'prompt' column with at least one row; found columns {list(frame.columns)}")
    def flag(value: Any) -> bool:  # CSV cells are text: "False" must not read as true
        return value is True or str(value).strip().lower() in ("true", "1", "yes")

    return [decode_prompt({"prompt": r["prompt"], "is_chat": flag(r.get("is_chat", False))})
            for r in frame.to_dict("records")]


def _answers(cfg, folder: Path, prompts: list, seed: int) -> list[str]:
    from alignment.config import ModelSettings
    from alignment.generation import generate
    from alignment.models import load_causal_lm, load_tokenizer
    from tasks.launcher import resolve_device

    settings = ModelSettings(name_or_path=str(folder))
    tokenizer = load_tokenizer(settings)
    model = load_causal_lm(settings, trainable=False)
    model = model.to(resolve_device(cfg.pipeline.device))
    result = generate(model, tokenizer, prompts, cfg.evaluation.generation, seed,
                      max_prompt_length=cfg.evaluation.max_prompt_length)
    return list(result.texts)


class ExportResult(BaseModel):
    sheet_id: str
    csv: str
    jsonl: str
    key: str
    items: int
    first_version: str
    second_version: str
    left_out: dict[str, int] = {}


def export_sheet(cfg, first: str = "champion", second: str = "challenger", prompts: list | None = None,
                 num_prompts: int | None = None, out_dir: str | Path | None = None,
                 seed: int | None = None) -> ExportResult:
    """Generate both versions' answers and write the blinded sheet (see the module docstring).

    ``first``/``second``: aliases or version numbers of ``<pipeline>-policy``. ``prompts``:
    None takes :func:`heldout_prompts`; at most ``num_prompts`` (default
    ``evaluation.num_prompts``) are used. ``out_dir``: default the sheet's folder in the home.
    Raises LookupError for an unknown alias or version and ValueError when both name one version.
    """
    from tasks import tracking

    name = tracking.policy_model_name(cfg.pipeline.name)
    versions = [_resolve(tracking, name, ref) for ref in (first, second)]
    if versions[0] == versions[1]:
        raise ValueError(f"{first} and {second} are both version {versions[0]} of {name}: nothing to compare")
    prompts = list(prompts if prompts is not None else heldout_prompts(cfg))[: num_prompts or cfg.evaluation.num_prompts]
    seed = cfg.evaluation.seed if seed is None else seed
    downloads = sheets_dir(cfg.home) / "models"
    answers = [_answers(cfg, tracking.download_model(name, v, downloads / f"v{v}"), prompts, seed) for v in versions]
    digest = hashlib.sha256(json.dumps([name, versions, seed, prompts, answers], default=str).encode()).hexdigest()
    sheet_id = digest[:12]
    frame, a_is, left_out = blinded_items(prompts, answers[0], answers[1], seed, sheet_id)
    if frame.empty:
        raise ValueError(f"v{versions[0]} and v{versions[1]} gave identical or empty answers to all {len(prompts)} "
                         "prompts: nothing for people to choose between")
    key = SheetKey(sheet_id=sheet_id, model=name, first_version=versions[0], second_version=versions[1],
                   first_ref=first, second_ref=second, created_at=datetime.now(timezone.utc).isoformat(),
                   seed=seed, a_is=a_is, left_out=left_out)
    out = Path(out_dir) if out_dir else sheets_dir(cfg.home) / sheet_id
    csv_path, jsonl_path, key_path = write_sheet(frame, key, out, cfg.home)
    return ExportResult(sheet_id=sheet_id, csv=str(csv_path), jsonl=str(jsonl_path), key=str(key_path),
                        items=len(frame), first_version=versions[0], second_version=versions[1], left_out=left_out)


def _resolve(tracking, name: str, ref: str) -> str:
    if ref.isdigit():
        tracking.model_version(name, ref)  # raises for an unknown version
        return ref
    version = tracking.alias_version(name, ref)
    if version is None:
        raise LookupError(f"{name} has no version with alias {ref!r}")
    return version


# ----------------------------------------------------------------------------- back
def unblind(votes: pd.DataFrame, key: SheetKey, confidence: float = 0.95) -> HumanResult | None:
    """People's verdict on one sheet from its validated pairwise rows (``conversation_id``,
    ``choice``, ``annotator_id``); rows of unknown items are ignored. None without votes."""
    votes = votes[votes["conversation_id"].isin(key.a_is.keys())]
    if votes.empty:
        return None
    a_is_second = votes["conversation_id"].map(key.a_is).eq("second").to_numpy()
    choice = votes["choice"].astype(str).to_numpy()
    second = np.where(choice == "tie", 0.5, np.where((choice == "a") == a_is_second, 1.0, 0.0))
    w = win_rate(second, 1.0 - second, confidence=confidence, groups=votes["conversation_id"].tolist())
    agree, pairs = 0, 0
    for _, group in votes.assign(_v=second).groupby("conversation_id"):
        values = group["_v"].to_numpy()
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                pairs += 1
                agree += values[i] == values[j]
    annotators = votes["annotator_id"].dropna().astype(str)
    return HumanResult(sheet_id=key.sheet_id, model=key.model, first_version=key.first_version,
                       second_version=key.second_version, win_rate=w, votes=len(votes),
                       annotators=int(annotators[annotators != ""].nunique()),
                       agreement=agree / pairs if pairs else None)


def human_results(home: str | Path, pairwise: pd.DataFrame | None, confidence: float = 0.95) -> list[HumanResult]:
    """Verdicts of every sheet with a key in the home, from validated pairwise rows (all batches)."""
    keys = load_keys(home)
    if not keys or pairwise is None or "source" not in pairwise.columns:
        return []
    sources = pairwise["source"].astype("string")
    out = []
    for sheet_id, key in keys.items():
        result = unblind(pairwise[(sources == SOURCE_PREFIX + sheet_id).fillna(False).to_numpy()], key, confidence)
        if result is not None:
            out.append(result)
    return out


def human_verdict(result: HumanResult, champion: str | None, gate, preferences) -> tuple[bool, list[str]]:
    """Whether people's verdict promotes ``result.second_version`` (``gate.judge: human``), and why."""
    w, thr = result.win_rate, gate.min_win_rate_lower_bound
    head = (f"People's win rate of v{result.second_version} over v{result.first_version} is {w.rate:.3f} "
            f"({w.confidence:.0%} CI {w.lower:.3f}–{w.upper:.3f} over {w.units} items, {result.votes} votes by "
            f"{result.annotators} annotators, sheet {result.sheet_id})")
    floor = preferences.annotator_min_agreement
    if result.agreement is None:
        reliability = "their agreement was not measured (no item labelled twice)"
    else:
        reliability = f"they agree on {result.agreement:.0%} of vote pairs (floor {floor:.0%})"
    reasons = [f"{head}; {reliability}."]
    if champion != result.first_version:
        reasons.insert(0, f"Not promoted: the sheet compares against v{result.first_version}, but the champion is "
                          f"{'v' + champion if champion else 'none'}.")
        return False, reasons
    if champion == result.second_version:
        return False, [f"v{result.second_version} is already the champion.", *reasons]
    if result.agreement is not None and result.agreement < floor:
        return False, ["Not promoted: people disagree with each other too often to be a trusted judge.", *reasons]
    if w.lower < thr:
        return False, [f"Not promoted: the lower bound {w.lower:.3f} misses gate.min_win_rate_lower_bound "
                       f"{thr:.3f}.", *reasons]
    return True, [f"Promoted by people (gate.judge: human): the lower bound {w.lower:.3f} clears {thr:.3f}.", *reasons]


def _decided(tags: dict[str, str], result: HumanResult) -> bool:
    """Whether this sheet's verdict on the version is already taken: it promoted, or it failed on
    the same votes (new votes on a sheet ask again; a later round never undoes a promotion)."""
    if tags.get(f"{TAG}gate_sheet") != result.sheet_id:
        return False
    return tags.get(f"{TAG}gate") == "passed" or tags.get(f"{TAG}gate_votes") == str(result.votes)


def human_evaluation_step(cfg, validated_dir: str | Path, parent_run_id: str | None) -> dict[str, Any]:
    """Record every returned sheet (MLflow child run ``human-eval``, version tags) and, with
    ``gate.judge: human``, promote a version people preferred over the champion. Returns a
    summary for the round's table (empty when no sheet has come back). Idempotent: re-running
    sets the same tags; a sheet's verdict is taken once per set of votes and never undone."""
    from tasks import tracking
    from tasks.data.handoff import read_validated_kind

    if not load_keys(cfg.home):
        return {}
    results = human_results(cfg.home, read_validated_kind(validated_dir, "pairwise"), cfg.evaluation.confidence)
    if not results:
        return {}
    name = tracking.policy_model_name(cfg.pipeline.name)
    summary: dict[str, Any] = {}
    promoted = []
    for result in results:
        tracking.set_version_tags(name, result.second_version, result.tags())
        w = result.win_rate
        tracking.set_version_tags(name, result.first_version, {
            f"{TAG}compared_with": f"v{result.second_version}: its win rate {w.rate:.3f} (CI {w.lower:.3f}-{w.upper:.3f}, "
                                   f"{w.units} items), sheet {result.sheet_id}"})
        summary[f"v{result.second_version} vs v{result.first_version}"] = round(result.win_rate.rate, 3)
        if cfg.gate.judge == "human" and not _decided(tracking.version_tags(name, result.second_version), result):
            passed, reasons = human_verdict(result, tracking.alias_version(name, tracking.CHAMPION), cfg.gate,
                                            cfg.preferences)
            tracking.set_version_tags(name, result.second_version,
                                      {f"{TAG}gate": "passed" if passed else "failed",
                                       f"{TAG}gate_reasons": " | ".join(reasons)[:5000],
                                       f"{TAG}gate_sheet": result.sheet_id, f"{TAG}gate_votes": str(result.votes)})
            if passed:
                tracking.promote(name, result.second_version, reason=reasons[0])
                promoted.append(result.second_version)
    if parent_run_id is not None:
        latest = results[-1]
        with tracking.child_run(parent_run_id, "human-eval") as run_id:
            tracking.log_metrics(run_id, {"human/win_rate": latest.win_rate.rate, "human/ci_low": latest.win_rate.lower,
                                          "human/ci_high": latest.win_rate.upper, "human/items": latest.win_rate.units,
                                          "human/votes": latest.votes, "human/annotators": latest.annotators,
                                          "human/sheets": len(results)})
            tracking.set_tags(run_id, {"alignflow.human.results":
                                       json.dumps([r.model_dump(mode="json") for r in results])[:5000]})
    if promoted:
        summary["promoted by people"] = ", ".join(f"v{v}" for v in promoted)
    return summary


def await_people(cfg, decision: dict[str, Any]) -> dict[str, Any]:
    """A round's gate decision under ``gate.judge: human``: never promote now (people have not seen
    this candidate); say how the verdict comes. Other judges: ``decision`` unchanged."""
    if cfg.gate.judge != "human":
        return decision
    note = ("Not promoted yet: the judge is people (gate.judge: human). Export a sheet of champion vs challenger "
            "with `alignflow eval-export`; once it comes back filled through the landing folder, the next run "
            "promotes this version if people prefer it.")
    return {**decision, "passed": False, "reasons": [note, *decision.get("reasons", [])]}
