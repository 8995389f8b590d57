"""The evaluation suite end to end on tiny random GPT-2 models built here (no downloads)."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification

from alignment.batching import decode_prompt, encode_prompt
from alignment.config import GenerationSettings
from alignment.generation import generate
from tasks.evaluation import metrics as M
from tasks.evaluation.report import EvalReport
from tasks.evaluation.settings import EvalSettings
from tasks.evaluation.suite import evaluate_models, load_policy, pair_logps, reference_logps, response_logps
from tests.tiny_models import BAD, GOOD, make_tiny_model, make_tokenizer, preference_pairs

PROMPTS = ["review the movie", "tell me about the plot", "the film was", "what think the music",
           "review the ending", "say it"] * 4
PAIRS = preference_pairs(6, seed=1, chat_every=3).to_dict("records")


def sentiment_oracle(texts):
    """Good words minus bad words: a stand-in for the demo's VADER oracle."""
    return [float(sum(w in GOOD for w in t.split()) - sum(w in BAD for w in t.split())) for t in texts]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    tok = make_tokenizer()
    reference = make_tiny_model(root / "reference", "gpt2", seed=0)
    candidate_model = AutoModelForCausalLM.from_pretrained(reference)
    with torch.no_grad():  # a nearby policy: small KL, different samples
        for p in candidate_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    candidate_model.save_pretrained(root / "candidate")
    tok.save_pretrained(root / "candidate")
    champion = make_tiny_model(root / "champion", "gpt2", seed=3)
    torch.manual_seed(5)
    rm_cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2ForSequenceClassification(rm_cfg).save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return {"reference": reference, "candidate": root / "candidate", "champion": champion, "reward": root / "reward"}


def settings(**kw) -> EvalSettings:
    gen = GenerationSettings(max_new_tokens=12, temperature=0.9, batch_size=8)
    return EvalSettings(num_prompts=24, generation=gen, seed=7, samples_table_rows=5, score_batch_size=8, **kw)


@pytest.mark.slow
def test_suite_returns_a_complete_report(folders):
    out = evaluate_models(folders["candidate"], folders["champion"], folders["reference"], PROMPTS, PAIRS,
                          reward_model=folders["reward"], oracle=sentiment_oracle, settings=settings(), beta=0.1)
    report = out.report
    assert EvalReport.model_validate_json(report.model_dump_json()) == report
    assert not report.champion_is_reference and report.num_prompts == 24 and report.num_pairs == 6
    for role in ("candidate", "champion", "reference"):
        m = report.model(role)
        assert m.reward_mean is not None and m.oracle_mean is not None and m.perplexity is not None
        assert 0 <= m.malformed_share <= 1 and 0 < m.distinct_1 <= 1 and m.length["max"] <= 12
    assert report.reference.kl == 0.0
    assert report.candidate.kl is not None and report.candidate.kl_se > 0
    assert {(w.judge, w.opponent) for w in report.win_rates} == {
        ("reward_model", "champion"), ("reward_model", "reference"), ("oracle", "champion"), ("oracle", "reference")}
    for w in report.win_rates:
        assert w.lower <= w.rate <= w.upper and w.wins + w.ties + w.losses == 24
    assert report.accuracy("reward_model") is not None
    assert report.accuracy("implicit_dpo", "candidate") is not None
    metrics = report.metrics()
    assert "eval/win_rate/oracle_vs_champion_lower" in metrics and "eval/candidate/kl" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert len(out.samples) == 5 and {"prompt", "candidate", "champion", "candidate_reward"} <= set(out.samples[0])
    row = out.samples[0]
    assert row["candidate_oracle"] == sentiment_oracle([row["candidate"]])[0]
    for role in ("candidate", "champion", "reference"):  # issue 15: readability guards' inputs
        m = report.model(role)
        assert m.fluency is not None and m.fluency < 0 and 0 <= m.repeated_trigram_rate <= 1
    # the reward model's agreement with the oracle, recounted from the per-sample scores
    rm, oracle = out.scores["reward model"], out.scores["oracle"]
    for opponent in ("champion", "reference"):
        d_rm = np.subtract(rm["candidate"], rm[opponent])
        d_or = np.subtract(oracle["candidate"], oracle[opponent])
        decided = d_or != 0
        agree = np.where(d_rm == 0, 0.5, (np.sign(d_rm) == np.sign(d_or)).astype(float))[decided]
        a = report.agreement(opponent)
        assert (a.n, a.oracle_ties) == (int(decided.sum()), int((~decided).sum()))
        assert a.rate == pytest.approx(agree.mean()) and a.lower <= a.rate <= a.upper
    assert "eval/judge_agreement/reward_model_vs_oracle_champion" in metrics


def test_distinct_window_scores_diversity_over_blocks_of_responses(folders):
    """``evaluation.distinct_window``: each model's distinct-1/2 is the mean over blocks of that many
    responses (recomputed here from every sampled text), pooled without it."""
    every = settings().model_copy(update={"samples_table_rows": 24})
    pooled = evaluate_models(folders["candidate"], None, folders["reference"], PROMPTS, None, settings=every)
    windowed = evaluate_models(folders["candidate"], None, folders["reference"], PROMPTS, None,
                               settings=every.model_copy(update={"distinct_window": 8}))
    for role in ("candidate", "reference"):
        texts = [row[role] for row in pooled.samples]
        assert len(texts) == 24 and texts == [row[role] for row in windowed.samples]  # the same samples
        assert pooled.report.model(role).distinct_2 == pytest.approx(M.distinct_n(texts, 2))
        assert windowed.report.model(role).distinct_2 == pytest.approx(M.windowed_distinct_n(texts, 2, 8))
        assert windowed.report.model(role).distinct_1 == pytest.approx(M.windowed_distinct_n(texts, 1, 8))
    assert windowed.report.candidate.distinct_2 > pooled.report.candidate.distinct_2  # blocks repeat less


@pytest.mark.slow
def test_identical_candidate_ties_everything_and_has_zero_kl(folders):
    """A candidate equal to the reference samples the same responses with the same seed:
    KL is 0, every comparison is a tie, the implicit reward ranks nothing."""
    out = evaluate_models(folders["reference"], None, folders["reference"], PROMPTS, preference_pairs(6, seed=1),
                          oracle=sentiment_oracle, settings=settings(judge="oracle"))
    r = out.report
    assert r.champion_is_reference and r.candidate.kl == pytest.approx(0.0, abs=1e-9)
    wr = r.win_rate("oracle", "champion")
    assert wr.ties == 24 and wr.rate == 0.5 and wr.lower < 0.5 < wr.upper
    assert r.win_rate("reward_model", "champion") is None
    implicit = r.accuracy("implicit_dpo", "candidate")
    assert implicit.accuracy == 0.5 and implicit.mean_margin == 0.0
    assert r.candidate.perplexity == pytest.approx(r.reference.perplexity)
    assert r.candidate.fluency == pytest.approx(r.reference.fluency)  # the same text under the same model


@pytest.mark.slow
def test_logps_match_an_independent_forward(folders):
    """Response and pair log-probs equal a plain full-softmax forward over each unpadded sequence."""
    model, tok = load_policy(folders["candidate"])
    gen = generate(model, tok, PROMPTS[:5], GenerationSettings(max_new_tokens=8, temperature=0.8, batch_size=3), 1)
    got = response_logps(model, gen, 0.8, batch_size=2)
    # the reference's log-probs at the sampling temperature and at 1 (fluency) come from one forward
    at_08, at_1 = reference_logps(model, gen, 0.8, batch_size=2)
    assert np.array_equal(at_08, got)
    for i in range(5):
        p = gen.prompt_ids[i][gen.prompt_mask[i].bool()]
        r = gen.response_ids[i][gen.response_mask[i].bool()]
        ids = torch.cat([p, r])[None]
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        for temperature, value in ((0.8, got[i]), (1.0, at_1[i])):
            logp = torch.log_softmax(logits / temperature, -1)
            want = sum(float(logp[len(p) - 1 + j, r[j]]) for j in range(len(r)))
            assert value == pytest.approx(want, abs=1e-4)
    assert not np.allclose(at_08, at_1)  # two temperatures, two figures
    chosen, rejected, tokens = pair_logps(model, tok, PAIRS[:2], settings())
    for i, pair in enumerate(PAIRS[:2]):
        p = encode_prompt(tok, decode_prompt(pair))
        for text, value in ((pair["chosen"], chosen[i]), (pair["rejected"], rejected[i])):
            c = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1)
            assert value == pytest.approx(sum(float(logp[len(p) - 1 + j, c[j]]) for j in range(len(c))), abs=1e-4)
        assert tokens[i] == len(tok(pair["chosen"], add_special_tokens=False)["input_ids"]) + 1
    assert np.all(np.isfinite(chosen))


@pytest.mark.slow
def test_plots_write_pngs(folders, tmp_path):
    from matplotlib.image import imread

    from tasks.evaluation import plots

    out = evaluate_models(folders["candidate"], None, folders["reference"], PROMPTS[:6], None,
                          reward_model=folders["reward"], oracle=sentiment_oracle, settings=settings())
    assert set(out.scores) == {"reward model", "oracle"} and set(out.scores["oracle"]) == {"candidate", "reference"}
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "phase": "train", "loss": 1 / (i + 1), "rewards/accuracy": i / 10, "kl": i})
             for i in range(10)] + [json.dumps({"step": 9, "phase": "eval", "loss": 0.2}), '{"step": 10, "lo']
    metrics.write_text("\n".join(lines))
    written = [
        plots.plot_score_distributions(out.scores, tmp_path / "a" / "scores.png"),
        plots.plot_reward_vs_kl([("v1", 0.0, 0.1), ("v2", 3.2, 0.3), ("v3", 7.5, 0.45)], tmp_path / "kl.png"),
        plots.plot_reward_vs_kl({"DPO": [("β=0.1", 9.0, 0.5), ("β=0.5", 2.0, 0.2)], "PPO": [("0.05", 6.0, 0.4)]},
                                tmp_path / "frontier.png"),
        plots.plot_training_curves(metrics, tmp_path / "curves.png"),
        plots.plot_closed_loop([{"round": 1, "oracle": 0.2, "kl": 3.0, "promoted": True},
                                {"round": 2, "oracle": 0.35, "kl": 6.0}], tmp_path / "loop.png", baseline=0.05),
    ]
    for path in written:
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path).shape[0] > 100
    with pytest.raises(ValueError, match="none of"):
        plots.plot_training_curves(metrics, tmp_path / "x.png", keys=["nonexistent"])


def test_a_reference_whose_tokenizer_lives_apart_is_evaluated_with_the_configured_one(folders, tmp_path):
    """model.policy.tokenizer: a base model folder without tokenizer files, its tokenizer in
    another folder (the trained candidate saves it in its own). The evaluation reads the
    configured tokenizer for the reference instead of failing on the bare folder."""
    import shutil

    bare = tmp_path / "bare-reference"
    shutil.copytree(folders["reference"], bare)
    tokenizer_files = [p for p in bare.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
    assert tokenizer_files
    separate = tmp_path / "tokenizer"
    separate.mkdir()
    for p in tokenizer_files:
        shutil.move(p, separate / p.name)
    few = settings()
    with pytest.raises(ValueError, match="has no tokenizer|different tokenizer"):
        evaluate_models(folders["candidate"], None, bare, PROMPTS, settings=few)
    out = evaluate_models(folders["candidate"], None, bare, PROMPTS, settings=few, reference_tokenizer=str(separate))
    same = evaluate_models(folders["candidate"], None, folders["reference"], PROMPTS, settings=few)
    assert out.report.candidate.kl == pytest.approx(same.report.candidate.kl)


def _plain_greedy(folder, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand: a full forward per token, argmax, stop at EOS."""
    model, tok = load_policy(folder)
    ids = encode_prompt(tok, prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_loop_figures_of_each_model(folders):
    """evaluation.greedy (issue 15 point 2): each model's greedy response to each evaluated prompt
    (not to each sample), its looping share and mean seq-rep-3 in the report and its metrics,
    and the greedy responses beside the samples; off, none of it."""
    from tasks.evaluation.metrics import loop_stats

    prompts = PROMPTS[:6]
    # random tiny models repeat themselves (seq-rep-3 0.3-0.9): a high threshold splits their prompts
    few = settings(samples_per_prompt=2, loop_threshold=0.85).model_copy(update={"samples_table_rows": 4})
    out = evaluate_models(folders["candidate"], folders["champion"], folders["reference"], prompts, None,
                          settings=few)
    report, metrics = out.report, out.report.metrics()
    assert report.loop_threshold == 0.85
    for role in ("candidate", "champion", "reference"):
        greedy = [_plain_greedy(folders[role], p, 12) for p in prompts]
        want = loop_stats(greedy, 3, 0.85)
        assert 0 < want.looping_share < 1
        m = report.model(role)
        assert m.greedy_looping_share == pytest.approx(want.looping_share)
        assert m.greedy_seq_rep3 == pytest.approx(want.mean_seq_rep)
        assert metrics[f"eval/{role}/greedy_looping_share"] == pytest.approx(want.looping_share)
        assert metrics[f"eval/{role}/greedy_seq_rep3"] == pytest.approx(want.mean_seq_rep)
        # two samples per prompt: rows 0-1 are prompt 0, rows 2-3 prompt 1
        assert [row[f"{role}_greedy"] for row in out.samples] == [greedy[0], greedy[0], greedy[1], greedy[1]]

    # more held-out prompts for the greedy figures only: the evaluated ones first, a duplicate dropped
    extra = ["the actors were", "a slow story of", "music and light"]
    wide = evaluate_models(folders["candidate"], None, folders["reference"], prompts[:3], None, settings=few,
                           greedy_prompts=[prompts[0], *extra])
    assert wide.report.num_prompts == 3 and wide.report.num_greedy_prompts == 6
    flags = {}
    for role in ("candidate", "reference"):
        greedy = [_plain_greedy(folders[role], p, 12) for p in [*prompts[:3], *extra]]
        m = wide.report.model(role)
        assert m.greedy_looping_share == pytest.approx(loop_stats(greedy, 3, 0.85).looping_share)
        assert m.greedy_looping_share_evaluated == pytest.approx(loop_stats(greedy[:3], 3, 0.85).looping_share)
        flags[role] = [loop_stats([g], 3, 0.85).looping_share for g in greedy]
    diff = [c - r for c, r in zip(flags["candidate"], flags["reference"], strict=True)]
    assert wide.report.greedy_loop_rise_se == pytest.approx(float(np.std(diff, ddof=1) / np.sqrt(6)))
    assert wide.report.metrics()["eval/greedy/num_prompts"] == 6

    off = evaluate_models(folders["candidate"], None, folders["reference"], prompts, None,
                          settings=settings(greedy=False))
    assert off.report.loop_threshold is None
    assert off.report.candidate.greedy_looping_share is None and off.report.reference.greedy_seq_rep3 is None
    assert off.report.num_greedy_prompts is None and off.report.greedy_loop_rise_se is None
    assert not any(k.startswith("eval/") and "greedy" in k for k in off.report.metrics())
    assert not any(k.endswith("_greedy") for k in off.samples[0])


@pytest.mark.slow
def test_kept_samples_are_read_back_and_change_nothing(folders, tmp_path, monkeypatch):
    """With ``sample_cache`` an evaluation keeps each model's samples; the next one with the same
    reference, prompts and settings samples only the models it has not seen (a round's new
    candidate) and reports exactly what a full evaluation reports. Another seed, or a model
    folder whose files changed, is sampled again; an entry without its JSON is ignored."""
    import tasks.evaluation.suite as suite

    calls = []
    real = suite.generate
    monkeypatch.setattr(suite, "generate", lambda model, *a, **k: calls.append(model.name_or_path) or real(model, *a, **k))
    cache = tmp_path / "eval-samples"
    kw = dict(reward_model=folders["reward"], oracle=sentiment_oracle, settings=settings(), beta=0.1)
    plain = evaluate_models(folders["candidate"], folders["champion"], folders["reference"], PROMPTS, PAIRS, **kw)
    first = evaluate_models(folders["candidate"], folders["champion"], folders["reference"], PROMPTS, PAIRS,
                            sample_cache=cache, **kw)
    assert len(calls) == 2 * 3 * 2  # sample + greedy for three models, twice
    assert len(list(cache.glob("*.json"))) == 3 and len(list(cache.glob("*.safetensors"))) == 3

    def same(a, b):
        da, db = a.report.model_dump(), b.report.model_dump()
        da.pop("wall_time_s"), db.pop("wall_time_s")
        assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)
        assert a.scores == b.scores and a.samples == b.samples

    same(first, plain)
    calls.clear()
    again = evaluate_models(folders["candidate"], folders["champion"], folders["reference"], PROMPTS, PAIRS,
                            sample_cache=cache, **kw)
    assert calls == []  # every model read back (the pairs' log-probs still computed)
    same(again, plain)

    # the next round: the champion is the old candidate, a new candidate; only the new one is sampled
    newer = tmp_path / "newer"
    model = AutoModelForCausalLM.from_pretrained(folders["candidate"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(newer)
    make_tokenizer().save_pretrained(newer)
    # the champion comes back from the registry: a copy of the old candidate's folder, read back all the same
    registered = tmp_path / "registry-cache" / "final"
    shutil.copytree(folders["candidate"], registered)
    lines = []
    nxt = evaluate_models(newer, registered, folders["reference"], PROMPTS, PAIRS, sample_cache=cache,
                          progress=lines.append, **kw)
    assert calls == [str(newer)] * 2
    # progress: one line per model, saying which were read back and which sampled, then the judges and statistics
    n, pairs = len(PROMPTS), len(PAIRS)
    assert [line.rsplit(" in ", 1)[0] for line in lines] == [
        f"reference: samples, log-probs and greedy responses read from the sample cache; {pairs} held-out pairs scored",
        f"candidate: {n} responses sampled and scored, {n} greedy; {pairs} held-out pairs scored",
        f"champion: samples, log-probs and greedy responses read from the sample cache; {pairs} held-out pairs scored",
        f"{3 * n} responses scored by the reward model and the oracle",
        "win rates, intervals and guard figures"]
    assert all(re.fullmatch(r".* in \d+\.\d s", line) for line in lines)
    same(nxt, evaluate_models(newer, registered, folders["reference"], PROMPTS, PAIRS, **kw))

    calls.clear()  # another seed: every model sampled again
    evaluate_models(folders["candidate"], None, folders["reference"], PROMPTS, None, sample_cache=cache,
                    **{**kw, "settings": settings().model_copy(update={"seed": 8})})
    assert len(calls) == 4
    calls.clear()  # a changed file in the candidate's folder: another model
    (newer / "config.json").write_text((newer / "config.json").read_text() + "\n")
    for meta in cache.glob("*.json"):  # and entries whose JSON is gone are incomplete
        meta.unlink()
    evaluate_models(newer, None, folders["reference"], PROMPTS, None, sample_cache=cache, **kw)
    assert len(calls) == 4
