"""Greedy-loop figures (issue 15, point 2): seq-rep-3 and the looping share against hand counts,
one definition for the evaluation and benchmarks/greedy_loops.py."""

from __future__ import annotations

import pytest

from benchmarks.greedy_loops import loop_summary
from tasks.evaluation.metrics import LOOP_THRESHOLD, loop_stats, looping, paired_share_diff_se, seq_rep

LOOPING = "a great pleasure to be a great pleasure to be"  # 8 trigrams, 5 distinct: 3/8 repeat
PLAIN = "the plot was slow but the actors were fine"  # "the" twice, no trigram twice: 0
SHORT = "great movie"  # under three words: no trigram, counts 0 (does not loop)
STUFFED = "good good good good good"  # 3 trigrams, 1 distinct: 2/3


def test_seq_rep_counts_repeated_trigrams_by_hand():
    assert seq_rep(LOOPING) == pytest.approx(3 / 8)
    assert seq_rep(PLAIN) == 0.0 and seq_rep(SHORT) == 0.0 and seq_rep("") == 0.0
    assert seq_rep(STUFFED) == pytest.approx(2 / 3)
    assert seq_rep(STUFFED, n=2) == pytest.approx(3 / 4)  # 4 bigrams, 1 distinct
    # words are lowercased \w+ runs and single punctuation marks, as the other text guards read them
    assert seq_rep("Fine. Fine. Fine.") == pytest.approx(2 / 4)  # fine . fine . fine . -> 4 trigrams, 2 distinct
    assert seq_rep(["x", "y", "z", "x", "y", "z"]) == pytest.approx(1 / 4)  # token lists pass as they are


def test_loop_stats_share_and_mean_by_hand():
    texts = [LOOPING, PLAIN, SHORT, STUFFED]
    out = loop_stats(texts)
    assert out.n == 4
    assert out.looping_share == pytest.approx(2 / 4)  # LOOPING and STUFFED exceed 0.1
    assert out.mean_seq_rep == pytest.approx((3 / 8 + 0 + 0 + 2 / 3) / 4)
    # the threshold is strict: a response at exactly the threshold does not loop
    assert loop_stats(texts, threshold=3 / 8).looping_share == pytest.approx(1 / 4)
    assert loop_stats(texts, threshold=0.7).looping_share == 0.0
    assert LOOP_THRESHOLD == 0.1
    with pytest.raises(ValueError, match="empty"):
        loop_stats([])


def test_the_benchmark_reports_the_evaluation_figures():
    texts = ["a good movie a good movie a good movie", PLAIN, "great"]  # 7 trigrams, 3 distinct: 4/7
    out = loop_summary(texts)
    assert out["mean_seq_rep3"] == round((4 / 7) / 3, 3)
    assert out["looping_share"] == round(1 / 3, 3)
    assert loop_summary(texts, threshold=0.6)["looping_share"] == 0.0
    assert 0 < out["distinct2"] < 1


def test_per_response_flags_and_the_paired_standard_error_by_hand():
    """The gate's rise of the looping share is paired per prompt: its standard error is the sample
    standard deviation of the per-prompt differences over sqrt(n)."""
    assert looping([LOOPING, PLAIN, SHORT, STUFFED]).tolist() == [True, False, False, True]
    assert looping([LOOPING], threshold=0.4).tolist() == [False]
    cand = [1, 1, 0, 1, 0]  # differences 0, 1, 0, 1, -1: mean 0.2, sample variance (4 * 0.04 + ... ) / 4
    ref = [1, 0, 0, 0, 1]
    d = [0, 1, 0, 1, -1]
    var = sum((x - 0.2) ** 2 for x in d) / 4
    assert paired_share_diff_se(cand, ref) == pytest.approx((var / 5) ** 0.5)
    # two models that loop on the same prompts: no spread, no error (unpaired it would be 0.2 or more)
    assert paired_share_diff_se([1, 0, 1, 0], [1, 0, 1, 0]) == 0.0
    assert paired_share_diff_se([1], [0]) != paired_share_diff_se([1], [0])  # NaN under two prompts
    with pytest.raises(ValueError, match="shape"):
        paired_share_diff_se([1, 0], [1, 0, 1])


def test_the_stage_adds_the_validation_prompts_only_when_asked(tmp_path):
    """``evaluation.greedy_splits``: the evaluation stage hands the validation split's prompts to the
    greedy decode (the demo's prompt table, else the dataset's file); with the default, none."""
    from pathlib import Path

    import pandas as pd

    from tasks.config import load_pipeline_config
    from tasks.records import ModelRecord
    from tasks.stages.data import DatasetRecord, data_dir
    from tasks.stages.evaluate import _greedy_extra_prompts

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    table = pd.DataFrame({"prompt_id": ["1", "2", "3"], "prompt": ["a test one", "a valid one", "a train one"],
                          "is_chat": False, "split": ["test", "validation", "train"]})
    file = tmp_path / "prompts-validation.parquet"
    table[table["split"] == "validation"].assign(prompt=["from the file"]).to_parquet(file)
    dataset = DatasetRecord(digest="d" * 16, out_dir=str(tmp_path), files={"prompts-validation": str(file)})
    base = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b" * 16)
    sets = [f"pipeline.home={tmp_path / 'home'}"]
    both = "evaluation.greedy_splits=[test, validation]"
    plain = load_pipeline_config(tiny, sets + [both]).model_copy(update={"demo": None})
    assert _greedy_extra_prompts(plain, dataset, base) == ["from the file"]
    assert _greedy_extra_prompts(plain.model_copy(update={"evaluation": plain.evaluation.model_copy(
        update={"greedy": False})}), dataset, base) is None
    default = load_pipeline_config(tiny, sets).model_copy(update={"demo": None})
    assert default.evaluation.greedy_splits == ["test"] and _greedy_extra_prompts(default, dataset, base) is None

    demo = load_pipeline_config(None, sets + [both])  # the demo: its own prompt table's validation split
    path = data_dir(demo) / "demo-prompts" / f"prompts-{base.digest}.parquet"
    path.parent.mkdir(parents=True)
    table.to_parquet(path)
    assert _greedy_extra_prompts(demo, dataset, base) == ["a valid one"]


def test_the_stage_evaluates_on_the_prompt_splits_asked_for(tmp_path):
    """``evaluation.prompt_splits``: test prompts first, then the validation split's, each once
    (the demo's prompt table, else the dataset's files); the default is the test split alone."""
    from pathlib import Path

    import pandas as pd
    import pytest

    from tasks.config import load_pipeline_config
    from tasks.records import ModelRecord
    from tasks.stages.data import DatasetRecord, data_dir
    from tasks.stages.evaluate import _eval_prompts, evaluation_inputs

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    file = tmp_path / "prompts-validation.parquet"
    pd.DataFrame({"prompt_id": ["2", "4"], "prompt": ["valid one", "shared one"], "is_chat": False}).to_parquet(file)
    dataset = DatasetRecord(digest="d" * 16, out_dir=str(tmp_path), files={"prompts-validation": str(file)})
    base = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b" * 16)
    sets = [f"pipeline.home={tmp_path / 'home'}"]
    both = "evaluation.prompt_splits=[test, validation]"
    test = ["test one", "shared one"]
    default = load_pipeline_config(tiny, sets).model_copy(update={"demo": None})
    assert default.evaluation.prompt_splits == ["test"]
    assert _eval_prompts(default, dataset, base, test) == test
    plain = load_pipeline_config(tiny, sets + [both]).model_copy(update={"demo": None})
    assert _eval_prompts(plain, dataset, base, test) == ["test one", "shared one", "valid one"]
    only = load_pipeline_config(tiny, sets + ["evaluation.prompt_splits=[validation]"]).model_copy(update={"demo": None})
    assert _eval_prompts(only, dataset, base, test) == ["valid one", "shared one"]
    with pytest.raises(ValueError, match="no held-out prompts"):
        _eval_prompts(only, DatasetRecord(digest="e" * 16, out_dir=str(tmp_path), files={}), base, test)

    # the demo: its own prompt table's test and validation splits
    demo = load_pipeline_config(None, sets + [both, "demo.pretraining_heldout_prompts=false"])
    table = pd.DataFrame({"prompt_id": ["1", "2", "3", "5"], "prompt": ["t1", "v1", "tr", "t2"], "is_chat": False,
                          "split": ["test", "validation", "train", "test"]})
    path = data_dir(demo) / "demo-prompts" / f"prompts-{base.digest}.parquet"
    path.parent.mkdir(parents=True)
    table.to_parquet(path)
    assert _eval_prompts(demo, dataset, base, test) == ["t1", "t2", "v1"]
    assert evaluation_inputs(demo, dataset, base)[0] == ["t1", "t2", "v1"]  # what benchmarks/frontier.py scores on

    # demo.pretraining_heldout_prompts: the held-out prompts cut from the pretraining documents come after the
    # table's, each once (cached beside the table; built from the corpus when missing)
    more = load_pipeline_config(None, sets + [both, "demo.pretraining_heldout_prompts=true"])
    extra = pd.DataFrame({"prompt_id": ["6", "7"], "prompt": ["p1", "t1"], "is_chat": False, "split": ["test", "validation"]})
    extra.to_parquet(path.parent / f"pretraining-heldout-{base.digest}.parquet")
    assert _eval_prompts(more, dataset, base, test) == ["t1", "t2", "v1", "p1"]
    assert _eval_prompts(demo, dataset, base, test) == ["t1", "t2", "v1"]  # off: the table's alone
    # when the table's held-out prompts fill evaluation.num_prompts (round 0) the extra ones are not even cut
    (path.parent / f"pretraining-heldout-{base.digest}.parquet").unlink()
    few = load_pipeline_config(None, sets + [both, "demo.pretraining_heldout_prompts=true", "evaluation.num_prompts=3"])
    assert _eval_prompts(few, dataset, base, test) == ["t1", "t2", "v1"]
    assert not (path.parent / f"pretraining-heldout-{base.digest}.parquet").exists()
