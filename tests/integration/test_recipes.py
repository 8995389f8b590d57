"""Recipes train for real on tiny models: learning, exact resume, LoRA, cached references, NaN guard."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignment.batching import collate_pairs
from alignment.config import DPOConfig, RewardConfig, SFTConfig
from alignment.logprobs import NonFiniteError
from alignment.models import CausalLMLogps, load_reference, load_reward_model, load_tokenizer, score_responses
from alignment.recipes.checkpoint import ResumeConfigError
from alignment.recipes.dpo import DPORecipe
from alignment.recipes.reward import RewardRecipe
from alignment.recipes.sft import SFTRecipe
from tests.tiny_models import demonstrations, make_tiny_model, preference_pairs, ranked_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    paths = {"model": make_tiny_model(root / "gpt2", "gpt2"), "root": root}
    for name, frame in {
        "pairs": preference_pairs(64, seed=0, chat_every=4),
        "pairs_eval": preference_pairs(32, seed=1),
        "demos": demonstrations(64, seed=0),
        "demos_eval": demonstrations(32, seed=1),
    }.items():
        paths[name] = root / f"{name}.parquet"
        frame.to_parquet(paths[name])
    return paths


def common(data, tmp_path, **overrides):
    base = {"model": {"name_or_path": str(data["model"])}, "output_dir": str(tmp_path / "run"), "batch_size": 8,
            "max_steps": 30, "optim": {"lr": 3e-3, "schedule": "constant"}, "max_length": 64, "max_prompt_length": 32}
    base.update(overrides)
    return base


def test_sft_lowers_held_out_loss(data, tmp_path):
    cfg = SFTConfig(**common(data, tmp_path, train_path=str(data["demos"]), eval_path=str(data["demos_eval"])))
    recipe = SFTRecipe(cfg)
    try:
        recipe.setup()
        before = recipe.evaluate()["eval/loss"]
        assert recipe.train()
        after = recipe.last_eval["eval/loss"]
        recipe.save()
    finally:
        recipe.cleanup()
    assert after < 0.5 * before, (before, after)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 30 and summary["metrics"]["eval/loss"] == after
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_dpo_reaches_preference_accuracy_on_training_pairs(data, tmp_path):
    cfg = DPOConfig(**common(data, tmp_path, train_path=str(data["pairs"]), eval_path=str(data["pairs"]),
                             beta=0.5, packing=True))
    summary = DPORecipe(cfg).run()
    metrics = summary["metrics"]
    assert metrics["eval/rewards/accuracy"] >= 0.9, metrics
    assert metrics["eval/rewards/margin"] > 0 and metrics["eval/loss"] < 0.3
    assert summary["packing"] is True
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert key in train[-1]


@pytest.mark.parametrize("loss_type,extra", [("ipo", {"beta": 0.5}), ("hinge", {"beta": 0.5}),
                                             ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
                                             ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1})])
def test_every_dpo_loss_type_learns_the_preference(data, tmp_path, loss_type, extra):
    cfg = DPOConfig(**common(data, tmp_path, train_path=str(data["pairs"]), eval_path=str(data["pairs_eval"]),
                             max_steps=12, loss_type=loss_type, **extra))
    metrics = DPORecipe(cfg).run()["metrics"]
    assert metrics["eval/rewards/accuracy"] >= 0.8 and metrics["eval/rewards/margin"] > 0, metrics


def test_dpo_with_response_groups_learns_rankings_with_the_pair_layouts_reference(data, tmp_path):
    """DPO on rankings compared in all their pairs, each response run once a batch: the precomputed
    reference log-probs are the shared-prompt pair layout's, and the policy learns the preference."""
    ranked_pairs(16, 4, seed=0).to_parquet(tmp_path / "ranked.parquet")
    ranked_pairs(6, 4, seed=1).to_parquet(tmp_path / "ranked_eval.parquet")
    refs = {}
    for share in (False, True):
        cfg = DPOConfig(**common(data, tmp_path, output_dir=str(tmp_path / f"run-{share}"),
                                 train_path=str(tmp_path / "ranked.parquet"), eval_path=str(tmp_path / "ranked_eval.parquet"),
                                 beta=0.5, batch_size=12, max_steps=20, packing=True, share_prompt=True,
                                 share_responses=share, ref_cache_dir=str(tmp_path / f"refs-{share}")))
        recipe = DPORecipe(cfg)
        summary = recipe.run()
        assert summary["share_responses"] is share
        refs[share] = torch.tensor([[e["ref_chosen"], e["ref_rejected"]] for e in recipe.train_set.examples])
    torch.testing.assert_close(refs[True], refs[False], atol=1e-4, rtol=1e-5)
    metrics = summary["metrics"]
    assert metrics["eval/rewards/accuracy"] >= 0.85 and metrics["eval/rewards/margin"] > 0, metrics


def test_reward_model_separates_clear_preference(data, tmp_path):
    cfg = RewardConfig(**common(data, tmp_path, train_path=str(data["pairs"]), eval_path=str(data["pairs_eval"]),
                                center_coef=0.01))
    metrics = RewardRecipe(cfg).run()["metrics"]
    assert metrics["eval/accuracy"] >= 0.9 and metrics["eval/margin"] > 1.0, metrics
    final = tmp_path / "run" / "final"
    settings = cfg.model.model_copy(update={"name_or_path": str(final)})
    tok = load_tokenizer(settings)
    model = load_reward_model(settings, tok, trainable=False)
    good, bad = score_responses(model, tok, ["review the movie"] * 2, ["it was good great happy", "it was bad awful sad"])
    assert good > bad + 1.0


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "train"]


def test_resume_continues_exactly_and_refuses_a_changed_config(data, tmp_path):
    # dropout on (GPT-2 default), grad accumulation, packing, warmup + cosine, an epoch boundary at step 8
    settings = common(data, tmp_path, train_path=str(data["pairs"]), batch_size=4, grad_accum=2, max_steps=12,
                      packing=True, beta=0.5, optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
                      save_every=3, ref_cache_dir=str(tmp_path / "refs"))
    straight = DPOConfig(**{**settings, "output_dir": str(tmp_path / "a")})
    split = DPOConfig(**{**settings, "output_dir": str(tmp_path / "b")})
    DPORecipe(straight).run()
    first = DPORecipe(split).run(until_step=6)
    assert not first["finished"] and first["steps"] == 6
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "phase": "tra')  # a crash mid-write leaves a torn line
    torn = tmp_path / "b" / "checkpoints" / "step-000009.tmp"  # and a crash mid-save, a partial checkpoint
    torn.mkdir()
    shutil.copy(tmp_path / "b" / "checkpoints" / "step-000006" / "state.json", torn / "state.json")
    second = DPORecipe(split)
    summary = second.run()
    assert summary["resumed_from"].endswith("step-000006") and summary["finished"]
    assert second.reference_forwards == 0  # reference log-probs came from the cache
    a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "rewards/margin"):
        torch.testing.assert_close([r[key] for r in b], [r[key] for r in a], rtol=1e-5, atol=1e-7)
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    changed = DPOConfig(**{**settings, "output_dir": str(tmp_path / "b"), "beta": 0.7, "max_steps": 14})
    with pytest.raises(ResumeConfigError, match=r"beta: 0\.5 -> 0\.7") as err:
        DPORecipe(changed).run()
    assert "max_steps: 12 -> 14" in str(err.value)


def test_overlapped_steps_give_the_same_run(data, tmp_path):
    """Reading each step's metrics one step late changes nothing: records, checkpoints, weights."""
    settings = common(data, tmp_path, train_path=str(data["pairs"]), eval_path=str(data["pairs_eval"]),
                      max_steps=7, eval_every=3, save_every=5, beta=0.5, ref_cache_dir=str(tmp_path / "refs"),
                      optim={"lr": 1e-3, "schedule": "cosine", "fused": True})
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap-{overlap}"
        recipe = DPORecipe(DPOConfig(**{**settings, "output_dir": str(out), "overlap_steps": overlap}))
        runs[overlap] = (out, recipe.run())
    (a, sa), (b, sb) = runs[False], runs[True]
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in rb] == [(r["step"], r["phase"]) for r in ra]
    assert [r["step"] for r in ra if r["phase"] == "eval"] == [3, 6, 7]
    for key in ("loss", "grad_norm", "lr", "rewards/margin"):
        torch.testing.assert_close([r.get(key) for r in rb], [r.get(key) for r in ra])
    assert sa["tokens_seen"] == sb["tokens_seen"]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == sorted(p.name for p in (a / "checkpoints").iterdir())
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("recipe_cls,config_cls", [(DPORecipe, DPOConfig), (RewardRecipe, RewardConfig)])
def test_shared_prompt_run_follows_the_plain_run(data, tmp_path, recipe_cls, config_cls):
    """``share_prompt`` trains the same model as the plain layout (Llama, no dropout: any gap is
    float summation order) while the model runs fewer tokens."""
    llama = make_tiny_model(tmp_path / "llama", "llama")
    settings = common(data, tmp_path, model={"name_or_path": str(llama)}, train_path=str(data["pairs"]),
                      eval_path=str(data["pairs_eval"]), max_steps=6, packing=True, optim={"lr": 1e-3})
    if recipe_cls is DPORecipe:
        settings.update(beta=0.5, ref_cache_dir=str(tmp_path / "refs"))
    runs = {}
    for share in (False, True):
        out = tmp_path / f"share-{share}"
        runs[share] = (out, recipe_cls(config_cls(**{**settings, "output_dir": str(out), "share_prompt": share})).run())
    (a, sa), (b, sb) = runs[False], runs[True]
    assert sb["share_prompt"] is True and sa["share_prompt"] is False
    assert sa["tokens_seen"] == sb["tokens_seen"]  # the same data, counted the same way
    ra, rb = _train_records(a), _train_records(b)
    torch.testing.assert_close([r["loss"] for r in rb], [r["loss"] for r in ra], atol=1e-5, rtol=1e-4)
    evals = sorted(k for k in sa["metrics"] if k.startswith("eval/"))
    assert evals
    torch.testing.assert_close([sb["metrics"][k] for k in evals], [sa["metrics"][k] for k in evals],
                               atol=1e-4, rtol=1e-3)
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


def test_lora_trains_only_adapter_weights(data, tmp_path):
    lora = {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]}
    cfg = DPOConfig(**common(data, tmp_path, train_path=str(data["pairs"]), max_steps=5, beta=0.5,
                             model={"name_or_path": str(data["model"]), "lora": lora}, reference="adapter_disabled"))
    recipe = DPORecipe(cfg)
    try:
        recipe.setup()
        before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
        recipe.train()
        after = dict(recipe.model.named_parameters())
        recipe.save()
    finally:
        recipe.cleanup()
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "merged" / "model.safetensors").exists()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000005"
    assert all("lora_" in k for k in load_file(str(ckpt / "adapter_model.safetensors")))


def test_precomputed_reference_equals_on_the_fly_and_is_reused(data, tmp_path):
    settings = common(data, tmp_path, train_path=str(data["pairs"]), max_steps=3, beta=0.5,
                      ref_cache_dir=str(tmp_path / "refs"))
    pre = DPORecipe(DPOConfig(**{**settings, "output_dir": str(tmp_path / "pre")}))
    pre.setup()
    assert pre.reference_forwards > 0 and pre.reference_cache_hits == []
    examples = pre.train_set.examples
    reference = CausalLMLogps(load_reference(pre.config.model))
    with torch.no_grad():
        seq = reference(collate_pairs(examples, pad_id=pre.tokenizer.pad_token_id))["seq_logps"]
    n = len(examples)
    torch.testing.assert_close(torch.tensor([e["ref_chosen"] for e in examples]), seq[:n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([e["ref_rejected"] for e in examples]), seq[n:], rtol=1e-5, atol=1e-5)
    pre.train()
    pre.cleanup()

    copy = DPORecipe(DPOConfig(**{**settings, "output_dir": str(tmp_path / "copy"), "reference": "copy"}))
    copy.run()
    assert copy.reference_forwards == 3  # one reference forward per step
    losses = [r["loss"] for r in _train_records(tmp_path / "copy")]
    torch.testing.assert_close(losses, [r["loss"] for r in _train_records(tmp_path / "pre")], rtol=1e-5, atol=1e-6)

    again = DPORecipe(DPOConfig(**{**settings, "output_dir": str(tmp_path / "again")}))
    cache_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "refs").iterdir()}
    again.run()
    assert again.reference_forwards == 0 and again.reference_cache_hits == ["train"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "refs").iterdir()} == cache_files


def test_separate_reference_model_anchors_the_implicit_reward(data, tmp_path):
    """With ``reference_model`` set, the policy starts from ``model`` but the reference
    log-probs (precomputed or a frozen copy) come from the other model."""
    other = make_tiny_model(tmp_path / "other", "gpt2", seed=7)
    settings = common(data, tmp_path, train_path=str(data["pairs"]), max_steps=2,
                      ref_cache_dir=str(tmp_path / "refs"), reference_model={"name_or_path": str(other)})
    pre = DPORecipe(DPOConfig(**{**settings, "output_dir": str(tmp_path / "pre")}))
    pre.setup()
    examples = pre.train_set.examples
    batch = collate_pairs(examples, pad_id=pre.tokenizer.pad_token_id)
    with torch.no_grad():
        want = CausalLMLogps(load_reference(pre.config.model, pre.config.reference_model))(batch)["seq_logps"]
        policy = CausalLMLogps(load_reference(pre.config.model))(batch)["seq_logps"]
    got = torch.tensor([e["ref_chosen"] for e in examples] + [e["ref_rejected"] for e in examples])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - policy).abs().max() > 1e-2  # not the starting policy's log-probs
    pre.train()
    pre.cleanup()
    copy = DPORecipe(DPOConfig(**{**settings, "output_dir": str(tmp_path / "copy"), "reference": "copy"}))
    copy.run()
    torch.testing.assert_close([r["loss"] for r in _train_records(tmp_path / "copy")],
                               [r["loss"] for r in _train_records(tmp_path / "pre")], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("fused", "overlap", "bad_step"), [(False, False, 3), (True, False, 3), (True, True, 4)],
                         ids=["host-check", "skipped-on-device", "overlapped"])
def test_nan_guard_stops_naming_the_step(data, tmp_path, fused, overlap, bad_step):
    # fused AdamW takes the deferred path (as on CUDA): no sync before the optimizer step; the
    # kernel skips the update on found_inf and the step raises once its metrics are read. With
    # overlapping steps, step 2's record (and so the poisoning) comes after step 3 has run, so
    # step 4 is the first bad one, reported while step 5 runs (skipped on the device as well).
    after_poison = {}

    def poison(record):  # one weight goes bad after step 2's record
        if record["phase"] == "train" and record["step"] == 2:
            params = dict(recipe.model.named_parameters())
            after_poison.update({k: v.detach().clone() for k, v in params.items()})
            with torch.no_grad():
                next(iter(params.values())).fill_(float("nan"))

    cfg = SFTConfig(**common(data, tmp_path, train_path=str(data["demos"]), max_steps=6, overlap_steps=overlap,
                             optim={"lr": 3e-3, "schedule": "constant", "fused": fused}))
    recipe = SFTRecipe(cfg, callbacks=[poison])
    with pytest.raises(NonFiniteError, match=f"non-finite loss at step {bad_step}") as err:
        recipe.setup()
        assert recipe._skips_on_device() is fused and recipe.overlaps_steps() is overlap
        recipe.train()
    assert err.value.step == bad_step
    assert [r["step"] for r in _train_records(tmp_path / "run")] == list(range(1, bad_step))
    first, *rest = after_poison
    now = dict(recipe.model.named_parameters())
    assert all(torch.equal(now[k], after_poison[k]) for k in rest)  # no bad step was ever applied
    recipe.cleanup()
