"""A small word-level tokenizer built with the `tokenizers` library, wrapped as `PreTrainedTokenizerFast`.

Text is split into single digits, runs of letters, single punctuation characters and single whitespace
characters, so numbers are spelled digit by digit (the policy learns arithmetic) and words are one token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
SPLIT_PATTERN = r"\d|[A-Za-z_]+|\s|[^\sA-Za-z_\d]"


def build_tokenizer(corpus: Iterable[str], *, extra_chars: str = "0123456789") -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is every piece seen in ``corpus`` (plus all digits)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([*corpus, " ".join(extra_chars)], trainer=trainer)
    # `tokenizer(text)` starts every sequence with BOS, as the policy was trained.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
