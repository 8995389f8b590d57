"""Tiny GPT-2 and Llama models with a word-level tokenizer, built from config (no downloads).

``make_tiny_model(tmp_path, "gpt2")`` saves an ordinary HF folder (config, safetensors,
tokenizer with a chat template) that every loader in :mod:`alignment.models` accepts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

GOOD = "good great happy love wonderful nice fine superb lovely bright".split()
BAD = "bad awful sad hate terrible poor ugly grim dull nasty".split()
NEUTRAL = (
    "the a movie film story plot actor scene music ending was is and it this that of to very quite "
    "really rather so with for in on at my his her their one two some many long short old new"
).split()
PROMPT_WORDS = "review tell me about write say what think how why user assistant".split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = sorted(set(GOOD + BAD + NEUTRAL + PROMPT_WORDS + [":", ".", ","]))
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def grads_of(model) -> list[torch.Tensor]:
    """Copies of every parameter's gradient; the model's gradients are then cleared."""
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`WORDS` with pad/unk/bos/eos and a chat template; adds no BOS."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(folder: str | Path, kind: str = "gpt2", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny ``kind`` ("gpt2" or "llama") causal LM plus tokenizer to ``folder``."""
    folder = Path(folder)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id}
    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **{**common, **overrides})
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}
        config = LlamaConfig(**{**shape, **common, **overrides})
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def preference_pairs(n: int, seed: int = 0, chat_every: int = 0) -> pd.DataFrame:
    """Pairs where the chosen response uses GOOD words and the rejected one BAD words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "review " + _sentence(rng, NEUTRAL, rng.randint(2, 6))
        is_chat = bool(chat_every) and i % chat_every == 0
        if is_chat:
            import json

            prompt = json.dumps([{"role": "user", "content": prompt}])
        rows.append({
            "prompt": prompt, "is_chat": is_chat,
            "chosen": _sentence(rng, NEUTRAL, 2) + " " + _sentence(rng, GOOD, rng.randint(2, 5)),
            "rejected": _sentence(rng, NEUTRAL, 2) + " " + _sentence(rng, BAD, rng.randint(2, 5)),
            "pair_id": f"p{i}", "weight": 1.0, "split": "train",
        })
    return pd.DataFrame(rows)


def ranked_pairs(prompts: int, k: int, seed: int = 0) -> pd.DataFrame:
    """``k`` responses of each prompt compared in all their pairs, the one with more GOOD words
    (and fewer BAD ones) chosen: a ranking, as reward data that rates several responses holds."""
    import itertools

    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        prompt = "review " + _sentence(rng, NEUTRAL, rng.randint(2, 6))
        good = rng.sample(range(5), k)
        responses = [" ".join([rng.choice(NEUTRAL)] + [rng.choice(GOOD) for _ in range(g)]
                              + [rng.choice(BAD) for _ in range(4 - g)]) for g in good]
        for x, y in itertools.combinations(range(k), 2):
            better, worse = (x, y) if good[x] > good[y] else (y, x)
            rows.append({"prompt": prompt, "is_chat": False, "chosen": responses[better],
                         "rejected": responses[worse], "pair_id": f"p{i}-{x}-{y}", "weight": 1.0, "split": "train"})
    return pd.DataFrame(rows)


def demonstrations(n: int, seed: int = 0) -> pd.DataFrame:
    """Prompt "review X" → response "the X was <good words>": a pattern a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(["movie", "film", "story", "plot", "music", "ending"])
        prompt = f"review the {topic}"
        response = f"the {topic} was " + " and ".join(rng.sample(GOOD, 2))
        rows.append({"prompt": prompt, "is_chat": False, "response": response, "weight": 1.0, "split": "train"})
    return pd.DataFrame(rows)
