"""Meta's release format of its multi-token prediction models (facebook/multi-token-prediction).

A folder holds ``consolidated.pth``, one ``torch.save``d flat state dict, and ``params.json``, the
keyword arguments of Meta's Llama ``ModelArgs`` plus ``n_future_tokens``. Our parameter names are
Meta's (model/layout.py), so the state dict is ours unchanged; only transformer heads have a place
in it (see ``check_meta_exportable``).

``n_layers`` means the same on both sides: Meta's model builds ``n_layers - n_future_tokens + 1``
entries of ``layers`` (the trunk, then head 1) and ``n_future_tokens - 1`` of ``extra_heads``, so
its ``n_layers`` counts every layer, heads included, like our ``model.n_layers``
(``LayerLayout``: L - n trunk layers and n heads). ``meta_params`` and ``model_config_of`` are the
one place that maps the two and say so key by key.

params.json holds only keys Meta's ``ModelArgs`` takes: its loader calls
``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``, which fails on any other key, or on
those two.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatrain.config import ModelConfig
from megatrain.errors import CheckpointError, ConfigError

WEIGHTS_FILE = "consolidated.pth"
PARAMS_FILE = "params.json"
# Meta's ModelArgs fields a loader sets itself (not architecture): ignored when reading.
RUNTIME_ARGS = ("max_batch_size", "max_seq_len")
# Meta's ModelArgs defaults (Llama 2) for the keys a params.json may leave out.
META_DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                 "rope_theta": 10000.0, "n_future_tokens": 1}
# ModelConfig field -> params.json key; every other ModelConfig field is not part of the format.
PARAM_OF_FIELD = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
                  "vocab_size": "vocab_size", "multiple_of": "multiple_of",
                  "ffn_dim_multiplier": "ffn_dim_multiplier", "norm_eps": "norm_eps",
                  "rope_theta": "rope_theta", "n_future": "n_future_tokens"}


def check_meta_exportable(cfg: ModelConfig) -> None:
    """Meta's layout holds independent transformer heads only: params.json cannot say that heads
    are chained (causal/anticausal; Meta's code would run them as independent heads, silently
    wrong), and linear heads (``linear_heads.*`` on a full-depth trunk) have no names there."""
    if cfg.mtp_kind == "sequential":
        raise ConfigError("model.mtp_kind=sequential cannot be written in Meta's format, which holds "
                          "the paper's parallel heads only (params.json has no MTP modules); use "
                          "--format hf (transformers' generate(use_mtp=True)) or --format deepseek-mtp")
    if cfg.head_type != "transformer":
        raise ConfigError(f"model.head_type={cfg.head_type} cannot be written in Meta's format, which "
                          f"holds independent transformer heads only (params.json has no head type); "
                          f"use --format hf for causal or replicated heads, or keep the run directory")


def meta_params(cfg: ModelConfig) -> dict:
    """params.json of a model: the same numbers under Meta's names (n_layers included, see above)."""
    check_meta_exportable(cfg)
    return {key: getattr(cfg, field) for field, key in PARAM_OF_FIELD.items()}


def model_config_of(params: dict, source: str, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a params.json (``source`` names it in errors). Llama 2's own params.json
    has ``vocab_size: -1`` (set from the tokenizer at load): ``vocab_size`` (the weights') fills it."""
    unknown = sorted(set(params) - set(PARAM_OF_FIELD.values()) - set(RUNTIME_ARGS))
    if unknown:  # e.g. Llama 3.1's use_scaled_rope: a model we would run differently
        raise CheckpointError(f"{source} has keys megatrain's model does not implement: "
                              f"{', '.join(unknown)}")
    missing = [key for key in ("dim", "n_layers", "n_heads", "vocab_size") if key not in params]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}")
    values = {**META_DEFAULTS, **params}
    if values["vocab_size"] <= 0 and vocab_size is not None:
        values["vocab_size"] = vocab_size
    fields = {field: values[key] for field, key in PARAM_OF_FIELD.items()}
    return ModelConfig(**fields, head_type="transformer")


def write_meta(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> list[Path]:
    """Write ``state`` (the model's full state dict) and params.json into the folder ``out``."""
    params = meta_params(cfg)
    torch.save({name: t.detach().contiguous() for name, t in state.items()}, out / WEIGHTS_FILE)
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    return [out / WEIGHTS_FILE, out / PARAMS_FILE]


def read_meta(folder: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The state dict (memory-mapped, CPU, as saved: fp32 from megatrain, bf16 from Meta) and
    the ModelConfig of a Meta-format folder."""
    folder = Path(folder).expanduser()
    weights, params_path = folder / WEIGHTS_FILE, folder / PARAMS_FILE
    for path in (weights, params_path):
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {folder} is not a Meta-format folder "
                                  f"(`megatrain export --format meta` writes {WEIGHTS_FILE} and "
                                  f"{PARAMS_FILE})")
    try:
        params = json.loads(params_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{params_path} is unreadable ({err})") from None
    try:  # mmap: a rank reads the pages of the tensors it copies, not the whole file
        state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure is "cannot load", with its cause
        raise CheckpointError(f"cannot load {weights}: {str(err).strip().splitlines()[-1]}") from err
    # Llama 2's releases carry the RoPE frequencies as a tensor; we compute them.
    state.pop("rope.freqs", None)
    embedding = state.get("tok_embeddings.weight")
    cfg = model_config_of(params, str(params_path), None if embedding is None else embedding.shape[0])
    return state, cfg
