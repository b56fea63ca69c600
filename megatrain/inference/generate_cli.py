"""``megatrain generate``: complete a prompt with a trained model, plainly or self-speculatively.

The model comes from a run directory (its newest intact checkpoint, or ``--checkpoint STEP``,
whatever layout it was trained with) or from a Meta-format export (``--from``); the tokenizer is
the training dataset's, or the ``tokenizer.json`` inside the export folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatrain.errors import ConfigError
from megatrain.inference.generate import DRAFT_POLICIES


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="run directory of a training run")
    source.add_argument("--from", dest="export_dir", metavar="EXPORT_DIR",
                        help="a folder written by `megatrain export --format meta`")
    parser.add_argument("--checkpoint", type=int, metavar="STEP",
                        help="with --run-dir: this step's checkpoint (default: the newest intact one)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to complete")
    prompt.add_argument("--prompt-file", help="a file holding the text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--speculative", action="store_true",
                        help="self-speculative decoding: heads 2..n draft, head 1 verifies (same "
                             "output as plain greedy decoding; samples from head 1's distribution)")
    parser.add_argument("--draft-policy", choices=DRAFT_POLICIES, default="adaptive",
                        help="with --speculative: adaptive (default: per row as many drafts as are "
                             "kept often enough to pay for their verification, plain decoding while "
                             "none are) | always (every draft on every forward)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs: auto = cuda if available, else cpu (default auto)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="the weights' dtype while decoding (default fp32)")
    parser.add_argument("--json", action="store_true",
                        help="print {text, tokens, forwards, tokens_per_forward, accepted_per_head, "
                             "tokens_per_s, decisions} as JSON (decisions: the draft policy's forwards "
                             "by block width, probes, catch-up forwards)")
    return parser


def run_generate(args) -> int:
    from megatrain.inference.generate import Generator, Sampling

    _check(args)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    tokenizer, eos_id, load, trained_len = _source(args)
    prompt = tokenizer.encode(text, add_special_tokens=False).ids
    if not prompt:
        raise ConfigError("the prompt is empty after tokenization; give some text with --prompt")
    # RoPE tables for every position this request reaches; past the trained context the model
    # extrapolates, which it may do badly: say so
    need = len(prompt) + args.max_new_tokens + 8
    if trained_len and len(prompt) + args.max_new_tokens > trained_len:
        print(f"note: {len(prompt)} prompt + {args.max_new_tokens} new tokens exceed the "
              f"{trained_len} the model was trained on; quality may degrade", file=sys.stderr)
    model = load(max(need, trained_len or 0), device, dtype)
    try:
        result = Generator(model).generate([prompt], args.max_new_tokens,
                                           sampling=Sampling(args.temperature, args.top_p, args.seed),
                                           speculative=args.speculative, eos_id=eos_id,
                                           draft_policy=args.draft_policy)
    except ValueError as err:  # a request the model cannot serve: the user's to fix
        raise ConfigError(str(err)) from None
    tokens = result.tokens[0]
    completion = tokenizer.decode([t for t in tokens if t != eos_id])
    if args.json:
        print(json.dumps({"text": completion, "tokens": tokens, "forwards": result.forwards,
                          "tokens_per_forward": result.tokens_per_forward,
                          "accepted_per_head": result.accepted_per_head,
                          "tokens_per_s": len(tokens) / max(result.seconds, 1e-9),
                          "decisions": result.decisions}))
    else:
        sys.stdout.write(text + completion + "\n")
        if args.speculative:
            print(f"[{result.tokens_per_forward:.2f} tokens per forward; kept per head: "
                  + " ".join(f"{a:.2f}" for a in result.accepted_per_head) + "]", file=sys.stderr)
    return 0


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.checkpoint is not None and args.export_dir:
        raise ConfigError("--checkpoint picks a step of a --run-dir; an export folder holds one model")
    if args.prompt_file and not Path(args.prompt_file).is_file():
        raise ConfigError(f"--prompt-file {args.prompt_file} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")


def _source(args):
    """The tokenizer, EOS id, a loader ``(max_seq_len, device, dtype) -> model`` and the trained
    context length (None if unknown) of a run directory's checkpoint or of an export folder."""
    from megatrain.inference.source import ModelSource

    source = ModelSource.open(args.run_dir, args.export_dir, args.checkpoint)
    tokenizer, eos_id = source.tokenizer()

    def load(max_seq_len, device, dtype):
        return source.load(device, dtype, max_seq_len)[0]
    return tokenizer, eos_id, load, source.trained_length()


# no trailing newline: the tokenizer merges a newline with the indentation after it, so a prompt
# ending in a bare "\n" asks for a new top-level statement instead of the body
SAMPLE_PROMPT = "def fibonacci(n):"


def _is_synthetic(cfg) -> bool:
    from megatrain.data.shards import read_manifest
    from megatrain.data.synth.dataset import SYNTH_KEY
    from megatrain.spec import dataset_dir_of

    return SYNTH_KEY in read_manifest(dataset_dir_of(cfg))


def print_sample(run_dir: str | Path, max_new_tokens: int = 48) -> None:
    """After a single-process training run: a greedy completion of a code prompt from the model
    just trained, decoded self-speculatively, and how many tokens each forward produced, so the
    point of the extra heads shows at the end of the first run."""
    from tokenizers import Tokenizer

    from megatrain.inference.export import dataset_tokenizer
    from megatrain.inference.generate import Generator
    from megatrain.inference.load import checkpoint_folder, config_of, load_checkpoint, read_checkpoint

    folder = checkpoint_folder(run_dir)
    cfg = config_of(folder)
    found = dataset_tokenizer(cfg)
    if found is None or _is_synthetic(cfg):  # a code prompt means nothing in a synthetic task's vocabulary
        return
    tokenizer = Tokenizer.from_file(str(found[0]))
    prompt = tokenizer.encode(SAMPLE_PROMPT, add_special_tokens=False).ids
    length = len(prompt) + max_new_tokens + cfg.model.n_future + 1
    _, (model, _) = read_checkpoint(run_dir, None, lambda f: load_checkpoint(f, max_seq_len=length),
                                    folder=folder)
    result = Generator(model).generate([prompt], max_new_tokens, speculative=True, eos_id=found[1])
    completion = tokenizer.decode([t for t in result.tokens[0] if t != found[1]])
    heads = f"{cfg.model.n_future} head{'' if cfg.model.n_future == 1 else 's'}"
    print(f"sample (greedy, {result.tokens_per_forward:.2f} tokens per forward with "
          f"{heads}):\n{SAMPLE_PROMPT}{completion}", flush=True)
