"""A word-level tokenizer built locally (``tokenizers``) from a corpus, shared by teacher and student.

Teacher and student use one tokenizer so that answer-token distributions can be compared position by
position (the optional KL term of AKD). Real BLIP-2 checkpoints bring their own tokenizer instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every lower-cased word and punctuation mark in ``corpus``.

    Ids are assigned in sorted order after the special tokens, so the same corpus always gives the same ids.
    Prompts are encoded as ``<s> words...``; unknown words map to ``<unk>``.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Whitespace()  # splits words from punctuation: "this?" -> "this", "?"
    words = {word for text in corpus for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))])}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
