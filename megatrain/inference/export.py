"""``megatrain export``: a run directory's model in Meta's or Hugging Face's format.

- ``meta``: Meta's release layout (inference/meta_format.py): ``consolidated.pth`` +
  ``params.json``, every head, our names unchanged. ``load_exported`` (inference/load.py) and
  ``init.path`` (a new run's initial weights) read it back.
- ``hf``: a ``transformers`` LlamaForCausalLM of the trunk + head 1 (``model.safetensors``,
  ``config.json``), so any Hugging Face tool runs the next-token model, and heads 2..n beside it in
  ``extra_heads.safetensors`` under Meta's names (``extra_heads.0.attention.wq.weight`` ...), their
  ``n_future_tokens`` and ``head_type`` in the file's metadata (replicated heads: their unembeddings,
  ``extra_outputs.k.weight``, beside a Llama of the full trunk). A sequential-MTP model
  (model.mtp_kind=sequential) exports its full trunk as the Llama and its modules as MTP layers in
  the same ``model.safetensors`` (inference/hf_mtp.py), with a small modeling file
  (``modeling_mtp_llama.py``, named by ``auto_map``) so that transformers' own
  ``generate(..., use_mtp=True)`` drafts with them (``trust_remote_code=True``).
- ``deepseek-mtp`` (sequential models): the same, the MTP layers also holding copies of the embedding
  and unembedding (``embed_tokens``, ``shared_head.head``), as DeepSeek-V3's released checkpoints.

Both formats get the run dataset's ``tokenizer.json`` when the dataset is on this machine (hf also a
``tokenizer_config.json`` naming its EOS token, so ``AutoTokenizer`` loads it). Weights keep the
checkpoint's float32.

RoPE: megatrain and Meta rotate consecutive pairs of a head's dimensions (complex-number RoPE,
model/transformer.py ``apply_rope``); HF Llama rotates dimension j with j + head_dim/2
(``rotate_half``). The same rotation is obtained by reordering the rows of wq and wk within each
head (``rope_rows_to_hf``), as transformers' own Llama converter does; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.config import Config, ModelConfig
from megatrain.data.shards import open_split
from megatrain.errors import ConfigError, DataError, UserError
from megatrain.inference.hf_mtp import (
    MTP_MODULE_NAMES,
    REMOTE_CODE,
    deepseek_copies,
    mtp_config_fields,
    mtp_layer_prefix,
)
from megatrain.inference.load import config_of, load_checkpoint, read_checkpoint
from megatrain.inference.meta_format import check_meta_exportable, write_meta
from megatrain.model.layout import LayerLayout
from megatrain.model.transformer import ffn_hidden_dim
from megatrain.spec import dataset_dir_of, trained_length

FORMATS = ("meta", "hf", "deepseek-mtp")
TOKENIZER_FILE = "tokenizer.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_EXTRA_HEADS_FILE = "extra_heads.safetensors"
# A block's parameters: our (Meta's) name -> HF Llama's, both relative to the layer.
HF_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_SHARED_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


@dataclass
class Exported:
    out: Path
    checkpoint: Path  # the checkpoint folder it was read from
    files: list[str]
    tokenizer: Path | None  # the dataset tokenizer copied along, None when there was none here


def check_hf_exportable(cfg: ModelConfig, fmt: str = "hf") -> None:
    """HF Llama is trunk + head 1 as one stack of blocks: head 1 must read the trunk output.
    ``deepseek-mtp`` holds sequential MTP modules only."""
    if fmt == "deepseek-mtp" and cfg.mtp_kind != "sequential":
        raise ConfigError("--format deepseek-mtp holds sequential MTP modules (model.mtp_kind="
                          "sequential); this model has parallel heads: use --format meta or hf")
    if cfg.head_type in ("linear", "anticausal"):
        reason = ("head 1 is a dim x dim map on a full-depth trunk, not a Llama block"
                  if cfg.head_type == "linear" else "head 1 reads head 2's output, not the trunk's")
        raise ConfigError(f"model.head_type={cfg.head_type} cannot be written as a Llama model: {reason}; "
                          f"only transformer and causal heads export to --format hf")


def rope_rows_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk (n_heads * head_dim, dim) with each head's rows reordered from Meta's RoPE pairs
    (2j, 2j+1) to HF's (j, j + head_dim/2): HF row j is our row 2j, HF row head_dim/2 + j our 2j+1."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    pairs = weight.reshape(n_heads, head_dim // 2, 2, dim)  # (head, pair j, member of the pair, dim)
    return pairs.transpose(1, 2).reshape(rows, dim).contiguous()  # members first, then pairs


def rope_rows_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``rope_rows_to_hf``."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim).contiguous()


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """Our name -> (HF name, the attention heads whose RoPE rows are reordered, or None) of every
    tensor ``model.safetensors`` holds: the trunk + head 1, or the trunk + the MTP layers."""
    names = {ours: (hf, None) for ours, hf in HF_SHARED_NAMES.items()}
    rope_heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads or cfg.n_heads}

    def block(ours_prefix: str, hf_prefix: str) -> None:
        for ours, hf in HF_BLOCK_NAMES.items():
            names[ours_prefix + ours] = (hf_prefix + hf, rope_heads.get(ours))

    for i, key in enumerate(LayerLayout.of(cfg).layer_keys):
        block(f"layers.{key}.", f"model.layers.{i}.")
    for j in range(LayerLayout.of(cfg).n_depths):
        prefix = mtp_layer_prefix(cfg, j)
        names.update({f"mtp.{j}.{ours}": (prefix + hf, None) for ours, hf in MTP_MODULE_NAMES.items()})
        block(f"mtp.{j}.block.", prefix)
    return names


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                  fmt: str = "hf") -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict of the trunk + head 1 (``layers.*``, HF's layer i = ours i);
    for sequential MTP, the trunk and then the MTP layers (inference/hf_mtp.py)."""
    check_hf_exportable(cfg, fmt)
    out = {}
    for ours, (hf, rope_heads) in hf_names(cfg).items():
        weight = state[ours]
        out[hf] = (rope_rows_to_hf(weight, rope_heads) if rope_heads else weight).contiguous()
    if fmt == "deepseek-mtp":
        out.update(deepseek_copies(state, cfg))
    return out


def _hf_extra(module: str):
    """A module of the ``hf`` extra; missing, a UserError naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"--format hf needs {module.split('.')[0]} ({err}); install it with "
                        f"pip install -e '.[hf]'") from None


def hf_config(cfg: Config, eos_id: int | None):
    """The transformers LlamaConfig of the trunk + head 1 (sequential MTP: the trunk, with the MTP
    keys and the remote-code class of inference/hf_mtp.py). ``megatrain_model`` records megatrain's
    own model config, so ``init.path`` reads the export back exactly."""
    m = cfg.model
    fields = dict(architectures=["LlamaForCausalLM"])
    if m.mtp_kind == "sequential":
        fields = mtp_config_fields(m)
    return _hf_extra("transformers").LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=ffn_hidden_dim(m),
        num_hidden_layers=len(LayerLayout.of(m).layer_keys), num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads, hidden_act="silu",
        max_position_embeddings=trained_length(cfg), rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=False,  # our embedding and unembedding are separate (docs/design.md)
        bos_token_id=None, eos_token_id=eos_id, dtype="float32",
        megatrain_model=json.loads(json.dumps(dataclasses.asdict(m))), **fields)


def write_hf(state: dict[str, torch.Tensor], cfg: Config, out: Path, eos_id: int | None = None,
             fmt: str = "hf") -> list[Path]:
    """config.json, model.safetensors (trunk + head 1; sequential: + the MTP layers) and
    extra_heads.safetensors (parallel heads) into ``out``."""
    save_file = _hf_extra("safetensors.torch").save_file
    config = hf_config(cfg, eos_id)
    save_file(hf_state_dict(state, cfg.model, fmt), str(out / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    files = [out / "config.json", out / HF_WEIGHTS_FILE]
    if cfg.model.mtp_kind == "sequential":  # the class generate(use_mtp=True) needs, as remote code
        shutil.copyfile(Path(__file__).parent / "hf_remote" / REMOTE_CODE, out / REMOTE_CODE)
        files.append(out / REMOTE_CODE)
    extra = {name: t.contiguous() for name, t in state.items()
             if name.startswith(("extra_heads.", "extra_outputs."))}
    if extra:
        save_file(extra, str(out / HF_EXTRA_HEADS_FILE),
                  metadata={"format": "pt", "n_future_tokens": str(cfg.model.n_future),
                            "head_type": str(cfg.model.head_type)})
        files.append(out / HF_EXTRA_HEADS_FILE)
    return files


def dataset_tokenizer(cfg: Config) -> tuple[Path, int] | None:
    """The tokenizer file and EOS id of the dataset ``cfg`` trained on; None when that dataset is
    not on this machine. (The embedded default corpus is rebuilt if missing: it is deterministic.)"""
    try:
        split = open_split(dataset_dir_of(cfg), "train")
    except DataError:
        return None
    return (split.tokenizer_path, split.eos_id) if split.tokenizer_path.is_file() else None


def _write_tokenizer(tokenizer: tuple[Path, int], out: Path, fmt: str) -> list[Path]:
    path, eos_id = tokenizer
    shutil.copyfile(path, out / TOKENIZER_FILE)
    files = [out / TOKENIZER_FILE]
    if fmt == "hf":  # without it AutoTokenizer would guess from config.json's model type (Llama)
        from tokenizers import Tokenizer

        eos = Tokenizer.from_file(str(path)).id_to_token(eos_id)
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}, indent=2) + "\n")
        files.append(out / "tokenizer_config.json")
    return files


def export_run(run_dir: str | Path, fmt: str, out: str | Path, step: int | None = None) -> Exported:
    """Export a run directory's checkpoint (newest intact, or ``step``) to the folder ``out``.

    ``out`` must be absent or empty; it is written as ``<out>.partial`` and renamed when complete,
    so an interrupted export never leaves a folder that looks finished.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; give a new folder")
    def read(folder: Path):
        cfg = config_of(folder)
        if fmt == "meta":  # before loading
            check_meta_exportable(cfg.model)
        else:
            check_hf_exportable(cfg.model, fmt)
        return load_checkpoint(folder)

    folder, (model, cfg) = read_checkpoint(run_dir, step, read)
    state = model.state_dict()
    tokenizer = dataset_tokenizer(cfg)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():  # an earlier export into this --out that did not finish
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if fmt == "meta":
        files = write_meta(state, cfg.model, staging)
    else:
        files = write_hf(state, cfg, staging, tokenizer[1] if tokenizer else None, fmt)
    if tokenizer is not None:
        files += _write_tokenizer(tokenizer, staging, fmt)
    if out.exists():
        out.rmdir()  # empty, checked above
    staging.rename(out)
    return Exported(out, folder, sorted(f.name for f in files), tokenizer[0] if tokenizer else None)
