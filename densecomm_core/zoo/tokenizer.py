"""The zoo's word-level tokenizer, built with `tokenizers` and saved in Hugging Face format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from densecomm_core.zoo.tasks import VOCABULARY


def build_tokenizer(vocabulary: Sequence[str] = VOCABULARY) -> PreTrainedTokenizerFast:
    """A closed-vocabulary word tokenizer that prepends ``<bos>``; both zoo LMs share it.

    ``vocabulary`` defaults to the v1 suite's; a later suite's vocabulary appends words to it, so the
    ids of v1 words never change."""
    vocab = {word: i for i, word in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)
    return tokenizer
