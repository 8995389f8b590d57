"""Public layouts: prompt/chosen/rejected (strings and chat lists), HH-RLHF, UltraFeedback."""

from __future__ import annotations

import json

import pandas as pd

from tasks.data.formats import convert, detect_layout, split_hh
from tasks.data.landing import read_and_validate
from tasks.data.settings import IngestSettings, SourceSettings

SETTINGS = IngestSettings(quarantine_max_share=1.0)

HH_CHOSEN = ("\n\nHuman: What is a good film for a rainy day?\n\nAssistant: Do you like comedies?"
             "\n\nHuman: Yes, light ones.\n\nAssistant: Try Paddington 2, it is warm and funny.")
HH_REJECTED = ("\n\nHuman: What is a good film for a rainy day?\n\nAssistant: Do you like comedies?"
               "\n\nHuman: Yes, light ones.\n\nAssistant: Films are a waste of time.")


def _validate(path, **opts):
    return read_and_validate([SourceSettings(path=str(path), **opts)], SETTINGS)


def test_split_hh_takes_the_shared_prefix_as_a_chat_prompt():
    messages, chosen, rejected = split_hh(HH_CHOSEN, HH_REJECTED)
    assert messages == [
        {"role": "user", "content": "What is a good film for a rainy day?"},
        {"role": "assistant", "content": "Do you like comedies?"},
        {"role": "user", "content": "Yes, light ones."},
    ]
    assert chosen == "Try Paddington 2, it is warm and funny." and rejected == "Films are a waste of time."
    assert split_hh(HH_CHOSEN, "\n\nHuman: something else\n\nAssistant: no") == "hh_prefix_mismatch"
    assert split_hh("no turns here", HH_REJECTED) == "hh_no_assistant_turn"


def test_hh_file_becomes_pairwise_chat_rows(tmp_path):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: other\n\nAssistant: x"}]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = _validate(path)
    assert detect_layout(["chosen", "rejected"]) == "chosen_rejected"
    valid = res.valid["pairwise"]
    assert len(valid) == 1 and bool(valid["is_chat"].iloc[0]) and valid["choice"].iloc[0] == "a"
    assert json.loads(valid["prompt"].iloc[0])[-1] == {"role": "user", "content": "Yes, light ones."}
    assert valid["response_a"].iloc[0] == "Try Paddington 2, it is warm and funny."
    assert res.quarantine["reasons"].tolist() == [["hh_prefix_mismatch"]]
    assert res.report.rows_in == 2 == res.report.rows_valid + res.report.rows_quarantined


def test_prompt_chosen_rejected_strings_and_chat_lists(tmp_path):
    strings = pd.DataFrame({"prompt": ["Rate it", "Rate it again"], "chosen": ["Great", "Fine"],
                            "rejected": ["Bad", "Fine"], "annotator_id": ["a1", "a2"]})
    strings.to_csv(tmp_path / "s.csv", index=False)
    res = _validate(tmp_path / "s.csv")
    valid = res.valid["pairwise"]
    assert valid[["prompt", "response_a", "response_b", "choice", "annotator_id"]].values.tolist() == \
        [["Rate it", "Great", "Bad", "a", "a1"]]
    assert res.quarantine["reasons"].tolist() == [["identical_responses"]]

    user = {"role": "user", "content": "Tell me a joke"}
    chat = [
        # TRL conversational: prompt list, chosen/rejected are the assistant turns
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "A pun."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        # UltraFeedback-binarized: full conversations in chosen/rejected, prompt as a string
        {"prompt": "Tell me a joke", "chosen": [user, {"role": "assistant", "content": "Knock knock."}],
         "rejected": [user, {"role": "assistant", "content": "Later."}]},
        # no prompt: the shared prefix is the prompt
        {"chosen": [user, {"role": "assistant", "content": "Why did..."}],
         "rejected": [user, {"role": "assistant", "content": "Ask someone else."}]},
        # two assistant turns after the prompt cannot be one response
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    res = _validate(path)
    valid = res.valid["pairwise"]
    assert valid["response_a"].tolist() == ["A pun.", "Knock knock.", "Why did..."]
    assert valid["response_b"].tolist() == ["No.", "Later.", "Ask someone else."]
    assert valid["is_chat"].tolist() == [True, False, True]
    assert json.loads(valid["prompt"].iloc[0]) == [user] and valid["prompt"].iloc[1] == "Tell me a joke"
    assert res.quarantine["reasons"].tolist() == [["response_not_single_assistant_turn"]]
    assert res.quarantine["source_row"].tolist() == [4]


def test_ultrafeedback_completions_become_rating_rows(tmp_path):
    records = [
        {"instruction": "Summarise the plot", "completions": [
            {"model": "m1", "response": "A boy meets a dog.", "fine-grained_score": 4.5},
            {"model": "m2", "response": "Stuff happens.",
             "annotations": {"helpfulness": {"Rating": "2"}, "honesty": {"Rating": "3"}, "truth": {"Rating": "N/A"}}},
            {"model": "m3", "response": "Out of scale.", "fine-grained_score": 7},
        ]},
        {"instruction": "Broken", "completions": "not a list"},
    ]
    path = tmp_path / "uf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    conv = convert(pd.read_json(path, lines=True))
    assert conv.kind == "rating" and list(conv.src) == [0, 0, 0] and conv.failures == [(1, "bad_completions")]
    res = _validate(path)
    valid = res.valid["rating"]
    assert valid["response"].tolist() == ["A boy meets a dog.", "Stuff happens."]
    assert valid["score"].tolist() == [4.5, 2.5]
    assert json.loads(valid["metadata"].iloc[0]) == {"completion": 0, "model": "m1"}
    assert sorted(map(tuple, res.quarantine["reasons"])) == [("bad_completions",), ("out_of_scale:completions.fine-grained_score",)]
    assert res.report.rows_in == 4 == res.report.rows_valid + res.report.rows_quarantined


def test_declared_columns_are_renamed_first(tmp_path):
    pd.DataFrame({"question": ["q"], "answer": ["a"], "stars": [5]}).to_parquet(tmp_path / "f.parquet")
    res = _validate(tmp_path / "f.parquet", columns={"question": "prompt", "answer": "response", "stars": "score"})
    assert res.valid["rating"][["prompt", "response", "score"]].values.tolist() == [["q", "a", 5.0]]
