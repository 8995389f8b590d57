"""A causal LM as a pairwise judge: both orders, ties when they disagree, the label read-out on a
real tiny model, and the suite and gate using it (quality depends on the judge model; these
tests check the mechanics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment.config import GenerationSettings
from tasks.evaluation.gate import decide
from tasks.evaluation.model_judge import JudgeModelSettings, ModelJudge, fill, judge_accuracy, verdicts
from tasks.evaluation.settings import EvalSettings, GateSettings
from tasks.evaluation.suite import evaluate_models
from tests.tiny_models import make_tiny_model, preference_pairs

TEMPLATE = "{prompt}|{response_a}|{response_b}"


def content_judge(texts: list[str]) -> np.ndarray:
    """Prefers the response with more 'good' words, wherever it is shown."""
    out = []
    for t in texts:
        _, a, b = t.split("|")
        out.append([float(a.count("good")), float(b.count("good"))])
    return np.array(out)


def always_a(texts: list[str]) -> np.ndarray:
    return np.tile([0.0, -1.0], (len(texts), 1))


def test_both_orders_decide_and_position_bias_becomes_ties():
    prompts = ["p1", "p2", "p3"]
    x, y = ["good good", "bad", "good"], ["bad", "good", "good"]
    assert verdicts(content_judge, TEMPLATE, prompts, x, y).tolist() == [1.0, 0.0, 0.5]
    assert verdicts(always_a, TEMPLATE, prompts, x, y).tolist() == [0.5, 0.5, 0.5]  # bias cancels
    with pytest.raises(ValueError, match="as many"):
        verdicts(content_judge, TEMPLATE, prompts, x[:2], y)
    chat = [{"role": "user", "content": "hi"}]
    assert fill("{prompt} / {response_a} / {response_b}", chat, "a", "b") == "user: hi / a / b"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("judge") / "m", "gpt2")


def test_label_read_out_on_a_real_tiny_model(tiny):
    settings = JudgeModelSettings(name_or_path=str(tiny), labels=("one", "two"), template="{prompt} {response_a} "
                                  "{response_b} say one or two :", batch_size=2)
    judge = ModelJudge(settings)
    prompts, x, y = ["review the movie", "the plot"] * 2, ["good film", "bad", "nice", "dull"], ["bad", "great", "sad", "fine"]
    out = judge.verdicts(prompts, x, y)
    assert out.shape == (4,) and set(out.tolist()) <= {0.0, 0.5, 1.0}
    assert out.tolist() == judge.verdicts(prompts, x, y).tolist()  # deterministic
    # the verdict is the label comparison of the model's next-token distribution, in both orders
    enc = judge.tokenizer(judge._wrap(fill(settings.template, prompts[0], x[0], y[0])), return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(**enc).logits[0, -1].float(), -1)
    one, two = (logp[sorted(ids)].logsumexp(0).item() for ids in judge.label_ids)
    assert judge.label_logps([fill(settings.template, prompts[0], x[0], y[0])])[0] == pytest.approx([one, two],
                                                                                                  abs=1e-4)
    acc = judge_accuracy(judge, preference_pairs(4, seed=2).to_dict("records"))
    assert acc.shape == (4,)
    with pytest.raises(ValueError, match="share a first token"):
        ModelJudge(settings.model_copy(update={"labels": ("one", "one")}))
    with pytest.raises(ValueError, match="no token"):
        ModelJudge(settings.model_copy(update={"labels": ("zebra", "two")}))


def test_suite_reports_the_judge_and_the_gate_holds_it_to_its_accuracy(tiny):
    judge = JudgeModelSettings(name_or_path=str(tiny), labels=("one", "two"),
                               template="{prompt} {response_a} {response_b} say one or two :")
    settings = EvalSettings(num_prompts=6, generation=GenerationSettings(max_new_tokens=6, temperature=0.9),
                            seed=3, judge_model=judge, samples_table_rows=0)
    pairs = preference_pairs(8, seed=1).to_dict("records")
    report = evaluate_models(tiny, None, tiny, ["review the movie", "the plot", "the film was"] * 2, pairs,
                             settings=settings).report
    w, acc = report.win_rate("model", "reference"), report.accuracy("model")
    assert w is not None and acc is not None and acc.n == 8
    assert w.rate == pytest.approx(0.5)  # the same model on both sides: every comparison ties or both are empty
    assert "eval/win_rate/model_vs_reference" in report.metrics()
    strict = decide(report, GateSettings(judge="model", min_judge_accuracy=min(1.0, acc.lower + 0.01),
                                         min_win_rate_lower_bound=0.0), has_champion=False)
    rule = next(c for c in strict.checks if c.rule == "win_rate")
    assert not rule.passed and "No trusted judge: the judge model" in rule.message
    lax = decide(report, GateSettings(judge="model", min_judge_accuracy=None, min_win_rate_lower_bound=0.0),
                 has_champion=False)
    rule = next(c for c in lax.checks if c.rule == "win_rate")
    assert rule.passed and "judged by the judge model" in rule.message and "Judge: the judge model" in rule.message
