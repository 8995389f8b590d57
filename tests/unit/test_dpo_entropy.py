"""The entropy term of DPO (``dpo.entropy_coef``): the per-row entropy of the LM head, the policy's
per-sequence entropy sums, and the loss term, each against an independent computation."""

from __future__ import annotations

import pytest
import torch

from alignment.batching import collate_sequences
from alignment.config import DPOConfig, ModelSettings
from alignment.losses import entropy_bonus, entropy_from_hidden, entropy_from_logits, entropy_without_token
from alignment.models import CausalLMLogps, load_causal_lm
from tests.tiny_models import make_tiny_model

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
COMPLETIONS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits.double()).entropy()


@pytest.mark.parametrize("chunk", [None, 3, 1024])
def test_entropy_from_hidden_is_the_head_distributions_entropy_with_its_gradient(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight, bias = torch.randn(50, 8) * 2, torch.randn(50)
    got = entropy_from_hidden(hidden, weight, bias, chunk)
    want = categorical_entropy(hidden @ weight.T + bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-5)


def test_entropy_bonus_is_the_negated_mean_token_entropy():
    sums, tokens = torch.tensor([6.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 0.0])
    assert torch.allclose(entropy_bonus(sums, tokens), torch.tensor([-2.0, -0.5, -3.0]))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    return ModelSettings(name_or_path=str(make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)))


def test_policy_seq_entropy_sums_the_entropy_at_each_response_position(tiny):
    model = load_causal_lm(tiny).eval()
    want = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True):  # one sequence at a time, full logits
            logits = model(torch.tensor([p + c])).logits[0]
            want.append(categorical_entropy(logits[len(p) - 1 : len(p) - 1 + len(c)]).sum())
        want = torch.stack(want)
        for packing, chunk, hidden in ((False, 1024, True), (True, 3, True), (False, 3, False)):
            wrapper = CausalLMLogps(model, chunk_size=chunk)
            wrapper.use_hidden = hidden and wrapper.use_hidden
            assert "seq_entropy" not in wrapper(collate_sequences(PROMPTS, COMPLETIONS, pad_id=0))
            wrapper.with_entropy = True
            got = wrapper(collate_sequences(PROMPTS, COMPLETIONS, pad_id=0, packing=packing))["seq_entropy"]
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_descending_the_entropy_term_raises_the_policys_entropy(tiny):
    model = load_causal_lm(tiny)
    wrapper = CausalLMLogps(model)
    wrapper.with_entropy = True
    batch = collate_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = wrapper(batch)
    for _ in range(5):
        out = wrapper(batch)
        opt.zero_grad()
        entropy_bonus(out["seq_entropy"], out["seq_tokens"]).mean().backward()
        opt.step()
    after = wrapper(batch)
    assert (after["seq_entropy"] / after["seq_tokens"]).mean() > (before["seq_entropy"] / before["seq_tokens"]).mean() + 1e-3


def test_entropy_coef_defaults_off_and_is_non_negative():
    assert DPOConfig().entropy_coef == 0.0
    with pytest.raises(ValueError):
        DPOConfig(entropy_coef=-0.1)


def entropy_of_the_rest(logits: torch.Tensor, token: int) -> torch.Tensor:
    """Independent: drop the token's column, renormalise, Categorical entropy in float64."""
    rest = torch.cat([logits[..., :token], logits[..., token + 1 :]], dim=-1)
    return categorical_entropy(rest)


@pytest.mark.parametrize("token", [0, 7, 49])
def test_entropy_without_token_is_the_entropy_of_the_renormalised_rest(token):
    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 3
    logits[0, token] = 30.0  # nearly all the mass on the excluded token: still the rest's entropy
    got = entropy_without_token(logits.log_softmax(-1), token)
    torch.testing.assert_close(got.double(), entropy_of_the_rest(logits, token), rtol=1e-5, atol=1e-5)
    # H(p) = h(p_e) + (1 - p_e) H(q)
    p_e = torch.softmax(logits.double(), -1)[:, token]
    binary = -(p_e * p_e.log() + (1 - p_e) * (1 - p_e).log())
    full = categorical_entropy(logits)
    torch.testing.assert_close(binary[1:] + (1 - p_e[1:]) * got[1:].double(), full[1:], rtol=1e-5, atol=1e-5)


def test_entropy_without_token_leaves_that_tokens_logit_alone():
    torch.manual_seed(2)
    logits = (torch.randn(5, 40) * 2).requires_grad_()
    (grad,) = torch.autograd.grad(entropy_without_token(logits.log_softmax(-1), 3).sum(), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[:, 3], torch.zeros(5), rtol=0, atol=1e-6)
    (want,) = torch.autograd.grad(entropy_of_the_rest(logits, 3).sum(), logits)
    torch.testing.assert_close(grad.double(), want.double(), rtol=1e-4, atol=1e-6)
    # the full entropy's gradient on a likely token's logit is not zero: it is what lowers p(EOS)
    (full_grad,) = torch.autograd.grad(categorical_entropy(logits).sum(), logits)
    assert full_grad[:, 3].abs().min() > 0


@pytest.mark.parametrize("chunk", [None, 3])
def test_entropy_from_hidden_without_a_token_matches_the_rest_with_its_gradient(chunk):
    torch.manual_seed(3)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight, bias = torch.randn(50, 8) * 2, torch.randn(50)
    got = entropy_from_hidden(hidden, weight, bias, chunk, exclude=4)
    want = entropy_of_the_rest(hidden @ weight.T + bias, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-5)
    logits = (hidden @ weight.T + bias).detach()
    torch.testing.assert_close(entropy_from_logits(logits, chunk, exclude=4).double(), want.detach(),
                               rtol=1e-5, atol=1e-5)


def test_policy_seq_entropy_without_eos_sums_the_rests_entropy(tiny):
    model = load_causal_lm(tiny).eval()
    eos = 21
    with torch.no_grad():
        want = torch.stack([
            entropy_of_the_rest(model(torch.tensor([p + c])).logits[0][len(p) - 1 : len(p) - 1 + len(c)], eos).sum()
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
        for packing, chunk, hidden in ((False, 1024, True), (True, 3, True), (False, 3, False)):
            wrapper = CausalLMLogps(model, chunk_size=chunk)
            wrapper.use_hidden = hidden and wrapper.use_hidden
            wrapper.with_entropy, wrapper.entropy_exclude = True, eos
            got = wrapper(collate_sequences(PROMPTS, COMPLETIONS, pad_id=0, packing=packing))["seq_entropy"]
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_entropy_excludes_eos_defaults_off():
    assert DPOConfig().entropy_excludes_eos is False


@pytest.mark.parametrize("excludes", [False, True])
def test_dpo_recipe_points_the_entropy_term_at_the_tokenizers_eos(tiny, tmp_path, excludes):
    from alignment.models import load_tokenizer
    from alignment.recipes.dpo import DPORecipe

    recipe = DPORecipe(DPOConfig(model=tiny, entropy_coef=0.03, entropy_excludes_eos=excludes,
                                 output_dir=str(tmp_path / "run")))
    recipe.build_models()
    assert recipe.train_module.with_entropy
    assert recipe.train_module.entropy_exclude == (load_tokenizer(tiny).eos_token_id if excludes else None)
