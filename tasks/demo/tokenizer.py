"""A byte-level BPE tokenizer trained on the demo corpus, wrapped for transformers.

Encoding adds ``<|bos|>`` in front (the post-processor), never ``<|eos|>``: a prompt encodes as
``<|bos|> prompt`` exactly as documents began in pretraining, and callers append EOS to
responses themselves. The chat template concatenates the messages' contents after BOS (the
model only knows review text, so a user message is read as the start of a review).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tasks.demo.settings import TokenizerSettings

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %} {% endif %}{{ message['content'] | trim }}"
    "{% endfor %}"
)


def train_tokenizer(texts: Sequence[str], settings: TokenizerSettings) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` (deterministic for the same texts and settings).

    Special tokens take ids 0 (pad), 1 (bos), 2 (eos); the 256 byte symbols are always in the
    vocabulary so any input text encodes.
    """
    if not texts:
        raise ValueError("cannot train a tokenizer on no texts")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """``<|bos|> text <|eos|>`` ids per document (the pretraining format)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [row + [tokenizer.eos_token_id] for row in ids]


def unused_token_ids(tokenizer: PreTrainedTokenizerFast, documents: Sequence[Sequence[int]]) -> list[int]:
    """Ids that never occur as a *target* in the encoded training documents (BOS, PAD, bytes
    outside the cleaned corpus' alphabet, ...). Generation suppresses them, so a sampled
    response is always valid UTF-8 without control characters."""
    counts = Counter(i for doc in documents for i in doc[1:])
    return [i for i in range(len(tokenizer)) if counts[i] == 0]
