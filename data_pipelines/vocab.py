"""Tokenizers for ``megatrain data prepare``, built with HF ``tokenizers`` so datatrove's
DocumentTokenizer can load them from ``tokenizer.json``.

- ``bytes``: 256 byte tokens with id = byte value, EOS = 256, vocab 257. A byte-level BPE model
  without merges; the byte-level pre-tokenizer maps every byte to one printable character.
- ``bpe``: byte-level BPE trained on the corpus, ``<|endoftext|>`` as special token id 0.
- a path: an existing Hugging Face ``tokenizer.json`` (e.g. Code Llama's 32k), used as it is; its
  end-of-document token is found by ``load_tokenizer_file``.

Both keep ``<|endoftext|>`` as a *special* token; the pipeline disables special-token parsing at
encode time, so only the EOS appended after each document gets that id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatrain.errors import DataError

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


# ------------------------------------------------------------------------------------------------
# An existing tokenizer (``--tokenizer PATH``)
# ------------------------------------------------------------------------------------------------

# end-of-document tokens of common tokenizers, tried in this order when nothing names one:
# GPT-2/StarCoder/ours, Llama-2/Code Llama/Mistral, Llama-3, Gemma
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


def resolve_tokenizer_file(path: str) -> Path:
    """``--tokenizer PATH``: a tokenizer.json, or a folder holding one."""
    file = Path(path).expanduser().resolve()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(
            f"--tokenizer {path}: no such file. Pass bpe, bytes, or the path of a Hugging Face "
            "tokenizer.json (or of the folder holding it)"
        )
    return file


def load_tokenizer_file(file: Path, eos_token: str = "") -> tuple[Tokenizer, str]:
    """The tokenizer in ``file`` and its end-of-document token: ``eos_token`` if given, else the
    ``eos_token`` of a ``tokenizer_config.json`` beside it, else the first of KNOWN_EOS_TOKENS it has."""
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for every parse error
        raise DataError(
            f"--tokenizer {file} is not a tokenizer.json the `tokenizers` library can load ({e}): pass the "
            "tokenizer.json of a Hugging Face tokenizer (saved with Tokenizer.save or save_pretrained), or "
            "--tokenizer bpe|bytes"
        ) from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if eos_token:
        if eos_token not in vocab:
            raise DataError(f"--eos-token {eos_token!r} is not a token of {file}: name one of its tokens")
        return tok, eos_token
    from_config = _eos_from_tokenizer_config(file.parent / "tokenizer_config.json")
    if from_config and from_config in vocab:
        return tok, from_config
    for candidate in KNOWN_EOS_TOKENS:
        if candidate in vocab:
            return tok, candidate
    raise DataError(
        f"--tokenizer {file} has no end-of-document token: none of {', '.join(KNOWN_EOS_TOKENS)} is in its "
        "vocabulary and no tokenizer_config.json beside it names an eos_token. Documents must be separated: "
        "pass --eos-token TOKEN naming the token that ends a document, or add one to the tokenizer "
        "(tokenizer.add_special_tokens([...]) then save it)"
    )


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Ids run from 0 to the largest one; added tokens may sit past the model's own vocabulary."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def file_sha256(file: Path) -> str:
    import hashlib

    return hashlib.sha256(file.read_bytes()).hexdigest()


def _eos_from_tokenizer_config(path: Path) -> str | None:
    import json

    try:
        eos = json.loads(path.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # transformers' AddedToken form
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
