"""Layouts people already have (issue 17, point 6): OpenAI ``messages`` and ShareGPT
``conversations`` chat lists as demonstrations (and the SFT set), TRL's unpaired
``prompt``/``completion``/``label`` as thumbs, TRL's ``prompt``/``completion`` as demonstrations,
a saved ``datasets`` folder in the landing folder, and the hub path (``datasets.load_dataset``)
exercised on a local dataset folder: there is no hub here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.data.formats import detect_layout
from tasks.data.landing import ingest, read_and_validate
from tasks.data.preferences import build_preferences
from tasks.data.settings import IngestSettings, SourceSettings

SETTINGS = IngestSettings(quarantine_max_share=1.0)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _validate(path, **source):
    return read_and_validate([SourceSettings(path=str(path), **source)], SETTINGS)


def _reasons(result) -> dict[int, list[str]]:
    q = result.quarantine
    return {int(r): list(why) for r, why in zip(q["source_row"], q["reasons"], strict=True)}


def _chat(i: int) -> list[dict]:
    return [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Review film {i}"},
            {"role": "assistant", "content": f"A warm, funny film ({i})."}]


def test_layouts_are_detected_from_the_columns():
    assert detect_layout(["messages"]) == "messages"
    assert detect_layout(["conversations", "id"]) == "messages"
    assert detect_layout(["prompt", "prompt_id", "messages"]) == "messages"  # UltraChat
    assert detect_layout(["prompt", "completion", "label"]) == "unpaired"
    assert detect_layout(["prompt", "completion"]) == "prompt_completion"
    assert detect_layout(["prompt", "chosen", "rejected", "messages"]) == "chosen_rejected"
    assert detect_layout(["prompt", "response", "messages"]) == "native"  # alignflow's fields win


def test_openai_messages_are_demonstrations_with_a_chat_prompt(tmp_path):
    rows = [{"messages": _chat(0)},
            {"messages": _chat(1)[:2]},  # ends with the user: nothing to imitate
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "assistant", "content": "hello"}]},  # no user turn
            {"messages": "not a conversation"},
            {"messages": _chat(5)[:2] + [{"role": "assistant", "content": "   "}]}]
    result = _validate(_jsonl(tmp_path / "chats.jsonl", rows))
    assert _reasons(result) == {2: ["last_turn_not_assistant:messages"], 3: ["bad_chat:messages"],
                                4: ["no_user_turn:messages"], 5: ["bad_chat:messages"], 6: ["blank:messages"]}
    demo = result.valid["demonstration"]
    assert len(demo) == 1 and bool(demo["is_chat"].iloc[0])
    assert json.loads(demo["prompt"].iloc[0]) == _chat(0)[:2]
    assert demo["response"].iloc[0] == "A warm, funny film (0)."
    assert result.report.rows_in == result.report.rows_valid + result.report.rows_quarantined == 6


def test_sharegpt_from_value_conversations_as_they_are(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                          {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "A film?"},
                                          {"from": "gpt", "value": "Try Paddington 2."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "robot", "value": "Beep."}]}]
    result = _validate(_jsonl(tmp_path / "sharegpt.jsonl", rows))
    assert _reasons(result) == {2: ["bad_chat:conversations"]}
    demo = result.valid["demonstration"]
    assert [m["role"] for m in json.loads(demo["prompt"].iloc[0])] == ["system", "user", "assistant", "user"]
    assert demo["response"].iloc[0] == "Try Paddington 2."
    assert any("columns not kept: id" in n for n in result.report.files[0].notes)


def test_trl_unpaired_prompt_completion_label_is_thumbs(tmp_path):
    rows = [{"prompt": "The film was", "completion": " wonderful.", "label": True},
            {"prompt": "The film was", "completion": " dull.", "label": False},
            {"prompt": [{"role": "user", "content": "Your verdict?"}],
             "completion": [{"role": "assistant", "content": "Loved it."}], "label": True},
            {"prompt": "The film was", "completion": [{"role": "user", "content": "?"}], "label": True},
            {"prompt": "The film was", "completion": "   ", "label": False},
            {"prompt": "The film was", "completion": " fine.", "label": "maybe"}]
    result = _validate(_jsonl(tmp_path / "kto.jsonl", rows))
    reasons = _reasons(result)
    assert reasons[4] == ["bad_chat:completion"] and reasons[5] == ["blank:completion"]
    assert reasons[6] and all(r.endswith(":label") for r in reasons[6])
    thumbs = result.valid["binary"]
    assert thumbs["response"].tolist() == [" wonderful.", " dull.", "Loved it."]
    assert thumbs["label"].tolist() == [True, False, True]
    assert thumbs["is_chat"].tolist() == [False, False, True]


def test_trl_prompt_completion_is_demonstrations(tmp_path):
    rows = [{"prompt": "Summarise: a dog finds home.", "completion": "A dog finds home."},
            {"prompt": "Summarise: nothing.", "completion": None}]
    result = _validate(_jsonl(tmp_path / "sft.jsonl", rows))
    assert _reasons(result) == {2: ["missing:completion"]}
    assert result.valid["demonstration"]["response"].tolist() == ["A dog finds home."]


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Film {i}?", "response_a": "great", "response_b": "awful", "choice": "a",
             "annotator_id": "ann-1"} for i in range(n)]


def test_a_saved_dataset_in_the_landing_folder_feeds_the_sft_set(tmp_path):
    import datasets

    landing = tmp_path / "landing"
    landing.mkdir()
    datasets.Dataset.from_list([{"messages": _chat(i)} for i in range(6)]).save_to_disk(str(landing / "chats"))
    _jsonl(landing / "pairs.jsonl", _pairs(6))
    settings = IngestSettings(landing_dir=str(landing), landing_quiet_s=0, quarantine_max_share=0.0)
    result = ingest(settings, tmp_path / "out")
    assert str(landing / "chats") in result.sources
    assert result.report["rows_valid"] == 12 and result.report["rows_quarantined"] == 0
    build = build_preferences({k: [v] for k, v in result.validated.items()}, tmp_path / "built")
    demo = pd.read_parquet(build.demonstrations)
    assert len(demo) == 6 and demo["is_chat"].all()
    assert json.loads(demo.sort_values("prompt")["prompt"].iloc[0])[1]["content"].startswith("Review film")
    again = ingest(settings, tmp_path / "out")
    assert str(landing / "chats") not in again.sources  # consumed once, like any landing file


@pytest.fixture
def local_hub_dataset(tmp_path, monkeypatch):
    """A dataset repository's layout (data/train-*.parquet) on disk, read with datasets.load_dataset
    like a hub id; its cache under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    repo = tmp_path / "someorg-feedback"
    (repo / "data").mkdir(parents=True)
    rows = [{"prompt": f"Film {i}?", "completion": f" verdict {i}", "label": i % 2 == 0} for i in range(5)]
    pd.DataFrame(rows).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[:2]).to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    return repo


def test_the_hub_path_reads_a_dataset_repository_by_split(local_hub_dataset):
    result = _validate(local_hub_dataset, format="hub")  # datasets.load_dataset, as for an id
    assert result.report.rows_valid == 5 and result.valid["binary"]["label"].tolist() == [True, False, True, False, True]
    test = _validate(local_hub_dataset, format="hub", split="test")
    assert test.report.rows_valid == 2
    with pytest.raises(ValueError, match="Unknown split"):
        _validate(local_hub_dataset, format="hub", split="nope")


def test_mixed_key_styles_in_one_parquet_file(tmp_path):
    """Arrow gives every message all four keys, the unused ones null: either style still reads."""
    frame = pd.DataFrame({"messages": [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        [{"from": "human", "value": "Film?"}, {"from": "gpt", "value": "Paddington 2."}]]})
    frame.to_parquet(tmp_path / "mixed.parquet")
    result = _validate(tmp_path / "mixed.parquet")
    assert result.report.rows_quarantined == 0
    assert result.valid["demonstration"]["response"].tolist() == ["Hello.", "Paddington 2."]


def test_trl_unpaired_thumbs_reach_the_kto_set(tmp_path):
    rows = [{"prompt": f"Film {i}?", "completion": f" {word} {i}", "label": word == "loved"}
            for i in range(6) for word in ("loved", "hated")]
    landing = tmp_path / "landing"
    landing.mkdir()
    _jsonl(landing / "kto.jsonl", rows)
    result = ingest(IngestSettings(landing_dir=str(landing), landing_quiet_s=0, quarantine_max_share=0.0),
                    tmp_path / "out")
    build = build_preferences({k: [v] for k, v in result.validated.items()}, tmp_path / "built")
    unpaired = pd.read_parquet(build.unpaired)
    assert len(unpaired) == 12
    assert {(c.split()[0], bool(label)) for c, label in zip(unpaired["completion"], unpaired["label"], strict=True)} \
        == {("loved", True), ("hated", False)}
