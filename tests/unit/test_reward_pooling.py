"""Reward pooling over the response (issue 15): ``sum``/``mean`` of per-token scores, in every
batch layout, saved with the model and honoured by every scorer (score_responses, the pyfunc)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignment.batching import collate_pairs, collate_sequences
from alignment.config import ConfigError, ModelSettings, RewardConfig
from alignment.models import (
    ScalarReward,
    hf_model,
    load_reward_model,
    load_tokenizer,
    response_pooled_hidden,
    save_model_folder,
    score_responses,
)
from alignment.prompt_sharing import collate_shared_prompt
from tests.tiny_models import make_tiny_model

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
COMPLETIONS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]
REJECTED = [[30, 31, 32], [33], [34, 35], [36, 37, 38, 39]]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return ModelSettings(name_or_path=str(folder))


def per_token_scores(model, prompt: list[int], response: list[int]) -> list[float]:
    """Independent reference: one sequence alone through the backbone, the head on each response
    token's hidden state, as a plain list of floats."""
    inner = hf_model(model)
    hidden = inner.base_model(input_ids=torch.tensor([prompt + response])).last_hidden_state[0]
    return [float(inner.score(hidden[len(prompt) + j])[0]) for j in range(len(response))]


def test_pooled_hidden_picks_exactly_the_response_positions():
    # hidden state at flat position k = [k, 1]: the pooled vector names the positions summed
    for packing in (False, True):
        batch = collate_sequences(PROMPTS, COMPLETIONS, pad_id=0, packing=packing)
        grid = batch["input_ids"].numel()
        hidden = torch.stack([torch.arange(grid, dtype=torch.float64), torch.ones(grid, dtype=torch.float64)], 1)
        ids = batch["input_ids"].flatten().tolist()
        sums = response_pooled_hidden(hidden, batch["target_index"], batch["target_seq"], batch["last_index"], "sum")
        means = response_pooled_hidden(hidden, batch["target_index"], batch["target_seq"], batch["last_index"], "mean")
        for i, completion in enumerate(COMPLETIONS):
            positions = [int(k) for k in range(grid) if ids[k] in completion]  # completion ids are unique
            assert sums[i].tolist() == [float(sum(positions)), float(len(positions))]
            assert means[i].tolist() == pytest.approx([sum(positions) / len(positions), 1.0])
    with pytest.raises(ValueError, match="reduce"):
        response_pooled_hidden(hidden, batch["target_index"], batch["target_seq"], batch["last_index"], "max")


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pooled_reward_equals_per_token_scores_in_every_layout(tiny, pooling):
    tok = load_tokenizer(tiny)
    model = load_reward_model(tiny, tok).eval()
    model.config.reward_pooling = pooling
    scorer = ScalarReward(model)
    assert scorer.pooling == pooling
    reduce = sum if pooling == "sum" else (lambda xs: sum(xs) / len(xs))
    with torch.no_grad():
        expected = [reduce(per_token_scores(model, p, c)) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
        expected_rej = [reduce(per_token_scores(model, p, r)) for p, r in zip(PROMPTS, REJECTED, strict=True)]
        padded = scorer(collate_sequences(PROMPTS, COMPLETIONS, pad_id=tok.pad_token_id))
        packed = scorer(collate_sequences(PROMPTS, COMPLETIONS, pad_id=tok.pad_token_id, packing=True))
        shared = scorer(collate_shared_prompt(PROMPTS, COMPLETIONS, REJECTED, pad_id=tok.pad_token_id))
    assert padded.tolist() == pytest.approx(expected, abs=1e-4)
    assert packed.tolist() == pytest.approx(expected, abs=1e-4)
    assert shared.tolist() == pytest.approx(expected + expected_rej, abs=1e-4)


def test_last_pooling_is_unchanged_and_differs_from_sum(tiny):
    tok = load_tokenizer(tiny)
    model = load_reward_model(tiny, tok).eval()
    batch = collate_sequences(PROMPTS, COMPLETIONS, pad_id=tok.pad_token_id)
    with torch.no_grad():
        last = ScalarReward(model)(batch)
        hf = torch.stack([model(torch.tensor([p + c])).logits[0, 0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
        model.config.reward_pooling = "sum"
        summed = ScalarReward(model)(batch)
    torch.testing.assert_close(last, hf, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last, summed, atol=1e-3)


def test_pooling_is_saved_and_every_scorer_of_the_folder_uses_it(tiny, tmp_path):
    import tasks.serving.reward_model as served

    tok = load_tokenizer(tiny)
    model = load_reward_model(tiny, tok).eval()
    model.config.reward_pooling = "sum"
    save_model_folder(model, tok, tmp_path / "rm")
    settings = ModelSettings(name_or_path=str(tmp_path / "rm"))
    again = load_reward_model(settings, load_tokenizer(settings), trainable=False)
    assert ScalarReward(again).pooling == "sum"
    prompts = ["review the movie", "review the plot", '[{"role": "user", "content": "review the film"}]']
    responses = ["good", "very bad film", "it was nice"]
    decoded = [prompts[0], prompts[1], [{"role": "user", "content": "review the film"}]]
    scores = score_responses(again, tok, decoded, responses, batch_size=2)
    with torch.no_grad():
        ids = [tok(p)["input_ids"] for p in prompts[:2]]
        expected = [sum(per_token_scores(again, i, tok(r, add_special_tokens=False)["input_ids"]))
                    for i, r in zip(ids, responses[:2], strict=True)]
    assert scores[:2] == pytest.approx(expected, abs=1e-4)
    pyfunc = served.RewardScorer()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(tmp_path / "rm")}))
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    assert pyfunc.predict(None, rows) == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_pyfunc_cuts_long_inputs_as_the_recipe_and_the_judge_do(tiny, tmp_path, pooling):
    """The served scorer truncates as the recipe trained (the lengths saved in config.json) and
    gives the gate's judge's scores (score_responses) on inputs longer than those lengths; the
    cut changes the score, so a scorer that did not cut would fail."""
    import tasks.serving.reward_model as served

    tok = load_tokenizer(tiny)
    model = load_reward_model(tiny, tok).eval()
    model.config.reward_pooling = pooling
    model.config.reward_max_length, model.config.reward_max_prompt_length = 14, 6
    save_model_folder(model, tok, tmp_path / "rm")
    prompts = ["review the movie " * 4, "a", "tell me about the plot and the actors of the film please"]
    responses = ["good " * 20, "very bad film that was long and dull and sad", "nice"]
    judged = score_responses(model, tok, prompts, responses, batch_size=2, max_length=14, max_prompt_length=6)
    uncut = score_responses(model, tok, prompts, responses, batch_size=2, max_length=512, max_prompt_length=256)
    assert judged[0] != pytest.approx(uncut[0], abs=1e-3)
    pyfunc = served.RewardScorer()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(tmp_path / "rm")}))
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    assert pyfunc.predict(None, rows) == pytest.approx(judged, abs=1e-4)


def test_config_takes_the_three_poolings_and_an_encoder_refuses_sum(tmp_path):
    assert RewardConfig().pooling == "last"
    assert RewardConfig(pooling="sum").pooling == "sum"
    with pytest.raises(ValueError):
        RewardConfig(pooling="max")
    from transformers import BertConfig, BertModel

    from alignment.recipes.reward import RewardRecipe
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    recipe = RewardRecipe(RewardConfig(model=ModelSettings(name_or_path=str(tmp_path / "bert")), pooling="sum",
                                       output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="pooling"):
        recipe.build_models()


def test_pair_batches_pool_chosen_then_rejected(tiny):
    tok = load_tokenizer(tiny)
    model = load_reward_model(tiny, tok).eval()
    model.config.reward_pooling = "sum"
    examples = [{"index": i, "prompt": p, "chosen": c, "rejected": r, "weight": 1.0}
                for i, (p, c, r) in enumerate(zip(PROMPTS, COMPLETIONS, REJECTED, strict=True))]
    with torch.no_grad():
        plain = ScalarReward(model)(collate_pairs(examples, pad_id=tok.pad_token_id))
        shared = ScalarReward(model)(collate_pairs(examples, share_prompt=True, pad_id=tok.pad_token_id))
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)


def test_fit_temperature_minimises_the_bt_log_loss_like_a_plain_grid_search():
    import math

    from alignment.recipes.reward import fit_temperature

    margins = [2.5, 1.0, -0.5, 3.0, 0.2, -1.5, 4.0, 0.8]

    def log_loss(t: float) -> float:
        return sum(math.log1p(math.exp(-d / t)) for d in margins) / len(margins)

    grid = [math.exp(-3 + 6 * i / 6000) for i in range(6001)]  # T from 0.05 to 20
    best = min(grid, key=log_loss)
    fitted = fit_temperature(torch.tensor(margins))
    assert fitted == pytest.approx(best, rel=2e-3)
    assert log_loss(fitted) <= log_loss(best) + 1e-9
    assert fit_temperature(torch.tensor([1.0, 2.0, 3.0])) == 1e-2  # all right: sharpen as far as allowed
    assert fit_temperature(torch.tensor([1.0, -1.0, 2.0, -2.0])) == 1e2  # no better than chance: flatten
