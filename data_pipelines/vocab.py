"""Tokenizers for ``megatrain data prepare``, built with HF ``tokenizers`` so datatrove's
DocumentTokenizer can load them from ``tokenizer.json``.

- ``bytes``: 256 byte tokens with id = byte value, EOS = 256, vocab 257. A byte-level BPE model
  without merges; the byte-level pre-tokenizer maps every byte to one printable character.
- ``bpe``: byte-level BPE trained on the corpus, ``<|endoftext|>`` as special token id 0.

Both keep ``<|endoftext|>`` as a *special* token; the pipeline disables special-token parsing at
encode time, so only the EOS appended after each document gets that id.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
BYTES_VOCAB_SIZE = 257
MIN_BPE_VOCAB_SIZE = 258  # 256 bytes + EOS + at least one merge


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others (controls,
    space, latin-1 blanks) to code points from 256 upwards, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_bytes_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == 256 and tok.get_vocab_size() == BYTES_VOCAB_SIZE
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """Byte-level BPE; the result can be smaller than ``vocab_size`` on a tiny corpus."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no unknowns
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with special-token parsing off, as the pipeline encodes documents."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = before
