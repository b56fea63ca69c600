"""Run configuration: documented dataclasses, merged as defaults < YAML file < dotted overrides.

The defaults *are* the embedded tiny CPU run (`megatrain train` with no arguments). Each field's
``doc`` becomes the config reference in the README (``megatrain config --reference``).
OmegaConf does the merging and the type checks; ``validate`` adds the cross-field rules. Every
error names the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatrain.errors import ConfigError

HEAD_TYPES = ("transformer", "linear", "causal", "anticausal")
ATTENTION_BACKENDS = ("sdpa", "xformers")
DEVICES = ("auto", "cpu", "cuda")


def doc(default: Any, text: str, **kwargs):
    """A dataclass field carrying its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    n_layers: int = doc(6, "Transformer layers in total, heads included: the trunk gets "
                           "n_layers - n_future, the heads one each (parameter-matched, paper §2).")
    n_future: int = doc(4, "Number of output heads; head i predicts token t+i. 1 = next-token Llama.")
    head_type: str = doc("transformer", "transformer (independent heads, default) | linear "
                                        "(a dim x dim map per head on a full-depth trunk) | causal "
                                        "(head i reads head i-1) | anticausal (head i reads head i+1).")
    dim: int = doc(128, "Model width.")
    n_heads: int = doc(4, "Attention heads.")
    n_kv_heads: Optional[int] = doc(None, "Key/value heads for grouped-query attention (None = n_heads).")
    vocab_size: int = doc(0, "Vocabulary size; 0 = the dataset tokenizer's, rounded up to a "
                               "multiple of 64 (so tensor parallelism can split it).")
    ffn_dim_multiplier: Optional[float] = doc(None, "Scales the SwiGLU hidden size (Llama convention).")
    multiple_of: int = doc(64, "SwiGLU hidden size is rounded up to a multiple of this.")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    rope_theta: float = doc(10000.0, "RoPE base frequency.")
    max_seq_len: int = doc(0, "Longest sequence RoPE is precomputed for; 0 = data.seq_len.")
    attention: str = doc("sdpa", "Attention kernel: sdpa (torch) | xformers (GPU only).")
    init_std: float = doc(0.02, "Standard deviation of the weight initialisation.")


@dataclass
class LossConfig:
    head_weights: List[float] = doc([], "Per-head loss weights, head 1 first; empty = 1 for every head.")
    ignore_index: int = doc(-100, "Target id that contributes no loss.")
    mask_cross_document: bool = doc(False, "Mask head i's target when an end-of-document token "
                                            "lies strictly between the input and the target.")
    impl: str = doc("auto", "fused_linear_cross_entropy implementation: auto | torch | triton.")


@dataclass
class DataConfig:
    path: str = doc("", "Prepared dataset folder (from `megatrain data prepare`); empty = build "
                        "the embedded stdlib corpus in data.cache_dir.")
    cache_dir: str = doc("~/.cache/megatrain/stdlib", "Where the embedded default corpus is cached.")
    seq_len: int = doc(128, "Tokens per training sequence (inputs); windows hold seq_len + 1.")
    val_batches: int = doc(4, "Batches of the validation split per evaluation.")


@dataclass
class TrainConfig:
    steps: int = doc(150, "Optimizer steps.")
    batch_size: int = doc(16, "Global batch: sequences per optimizer step, whatever the layout.")
    micro_batch_size: int = doc(0, "Sequences per rank per forward/backward; 0 = the whole "
                                   "per-rank batch. Gradient accumulation makes up the rest.")
    lr: float = doc(3e-3, "Peak learning rate.")
    min_lr_ratio: float = doc(0.03, "Cosine decay ends at this fraction of the peak (paper: 3%).")
    warmup_steps: int = doc(20, "Linear warmup steps.")
    weight_decay: float = doc(0.1, "AdamW weight decay (not applied to norms).")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    seed: int = doc(0, "Seed for initialisation and data order.")
    deterministic: bool = doc(True, "Deterministic algorithms (bit-exact resume on CPU).")
    device: str = doc("auto", "auto (cuda if available) | cpu | cuda.")
    dtype: str = doc("auto", "Autocast dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16.")
    eval_every: int = doc(50, "Validation every this many steps; 0 = never.")
    max_bad_steps: int = doc(3, "Stop after this many consecutive NaN/inf steps (none applied).")
    threads: int = doc(0, "CPU threads for torch; 0 = torch's default.")
    compile: bool = doc(False, "torch.compile every transformer block (trunk and heads); not "
                               "with parallel.sequence_parallel.")


@dataclass
class CheckpointConfig:
    every: int = doc(50, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.")
    keep: int = doc(2, "How many checkpoints to keep.")
    resume: bool = doc(True, "Resume from the latest checkpoint in run.dir if there is one.")
    async_save: bool = doc(False, "Write checkpoints in a background thread on a process group of "
                                  "their own; 'latest' moves once every rank has written.")


@dataclass
class LoggingConfig:
    every: int = doc(1, "Log metrics every this many steps.")
    tensorboard: bool = doc(True, "Write TensorBoard event files to run.dir/tensorboard.")
    progress: bool = doc(True, "Show a progress bar.")


@dataclass
class RunConfig:
    dir: str = doc("runs/default", "Run directory: config, metrics, TensorBoard, checkpoints.")


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
DP_ENGINES = ("fsdp", "deepspeed")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    dp: int = doc(1, "Data-parallel degree (FSDP2 shards parameters, gradients and optimizer state "
                     "over these ranks). dp * tp * pp must equal the number of processes.")
    tp: int = doc(1, "Tensor-parallel degree: attention heads, SwiGLU hidden units and the "
                     "vocabulary are split over this many ranks. Must divide model.n_heads, "
                     "model.n_kv_heads and model.vocab_size; keep it within one node.")
    pp: int = doc(1, "Pipeline-parallel degree: ranks that each hold a contiguous slice of the "
                     "trunk. The last pipeline rank holds every MTP head, the norm, the unembedding "
                     "and the loss.")
    pp_schedule: str = doc("1f1b", "Pipeline schedule: gpipe | 1f1b | interleaved_1f1b "
                                   "(parallel.virtual_stages per rank) | zbv | dualpipev "
                                   "(V-shaped: 2 stages per rank).")
    microbatches: int = doc(0, "Pipeline microbatches per step and data-parallel rank; 0 = the "
                               "per-rank batch / train.micro_batch_size (or the number of pipeline "
                               "stages when micro_batch_size is 0). Only used when pp > 1.")
    virtual_stages: int = doc(2, "Stages per pipeline rank for interleaved_1f1b (zbv and dualpipev "
                                 "always use 2; gpipe and 1f1b always 1).")
    stage_layers: List[int] = doc([], "Trunk layers per pipeline stage, first stage first, e.g. "
                                      "[3, 2, 1]; must sum to the trunk's layer count. Empty = "
                                      "balanced automatically (a head costs a layer plus its "
                                      "unembedding).")
    sequence_parallel: bool = doc(False, "With tp > 1, also shard the trunk's norms and residual "
                                         "stream along the sequence (less activation memory).")
    dp_engine: str = doc("fsdp", "Data-parallel engine: fsdp (FSDP2, composes with tp and pp) | "
                                 "deepspeed (ZeRO, dp only).")
    zero_stage: int = doc(3, "DeepSpeed ZeRO stage 1 | 2 | 3 (parallel.dp_engine=deepspeed only).")
    offload_optimizer: bool = doc(False, "DeepSpeed ZeRO-Offload: keep the fp32 master weights and "
                                         "AdamW state in CPU memory and step them there "
                                         "(parallel.dp_engine=deepspeed with zero_stage 2 or 3).")
    activation_checkpointing: str = doc("none", "none | selective (every other trunk layer) | full "
                                                "(every trunk layer).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        known = _known_keys(section)
        return ConfigError(f"{source}: unknown config key '{key}'. Known keys"
                           f"{' in ' + section if section else ''}: {', '.join(known)}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}. "
                       f"See `megatrain config --reference` for the field's type.")


def _known_keys(section: str) -> list[str]:
    node = Config()
    for part in [p for p in section.split(".") if p]:
        node = getattr(node, part, None)
        if node is None or not dataclasses.is_dataclass(node):
            return [f.name for f in dataclasses.fields(Config)]
    return [f.name for f in dataclasses.fields(node)]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``key=value`` overrides, validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                              f"to --config (see configs/).")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100).")
        key = item.split("=", 1)[0]
        if "." not in key:
            raise ConfigError(f"override '{item}': keys are dotted section.field, e.g. train.steps=100.")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field rules; each failure names the keys and the fix."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.head_type not in HEAD_TYPES:
        raise ConfigError(f"model.head_type='{m.head_type}' is not one of {HEAD_TYPES}.")
    if m.attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention='{m.attention}' is not one of {ATTENTION_BACKENDS}.")
    if m.n_future < 1:
        raise ConfigError(f"model.n_future={m.n_future} must be at least 1.")
    if m.head_type != "linear" and m.n_future >= m.n_layers:
        raise ConfigError(f"model.n_future={m.n_future} must be smaller than model.n_layers="
                          f"{m.n_layers}: the heads take n_future of the layers and the trunk "
                          f"needs at least one. Raise model.n_layers or lower model.n_future.")
    if m.n_layers < 1 or m.dim < 1 or m.n_heads < 1:
        raise ConfigError("model.n_layers, model.dim and model.n_heads must be positive.")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}.")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for RoPE.")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}.")
    if m.vocab_size < 0:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 0 (0 = from the dataset).")
    if d.seq_len <= m.n_future:
        raise ConfigError(f"data.seq_len={d.seq_len} must be larger than model.n_future="
                          f"{m.n_future}, or head {m.n_future} has no target in the window.")
    if cfg.loss.head_weights and len(cfg.loss.head_weights) != m.n_future:
        raise ConfigError(f"loss.head_weights has {len(cfg.loss.head_weights)} entries but "
                          f"model.n_future={m.n_future}; give one weight per head or leave it empty.")
    if cfg.loss.impl not in ("auto", "torch", "triton"):
        raise ConfigError(f"loss.impl='{cfg.loss.impl}' is not one of auto, torch, triton.")
    if t.steps < 0 or t.batch_size < 1 or t.micro_batch_size < 0:
        raise ConfigError("train.steps >= 0, train.batch_size >= 1 and train.micro_batch_size >= 0.")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}.")
    if t.device not in DEVICES:
        raise ConfigError(f"train.device='{t.device}' is not one of {DEVICES}.")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype='{t.dtype}' is not one of auto, fp32, bf16.")
    if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0:
        raise ConfigError("train.lr > 0, 0 <= train.min_lr_ratio <= 1, train.warmup_steps >= 0.")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} must be at least 1.")
    if t.compile and cfg.parallel.sequence_parallel:
        raise ConfigError("train.compile=true with parallel.sequence_parallel=true is not supported "
                          "(per-block compiled backward fails under sequence parallelism in torch "
                          "2.13); set one of them to false")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} must be at least 1.")
    if not cfg.run.dir:
        raise ConfigError("run.dir is empty; give a run directory, e.g. run.dir=runs/my_run.")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def reference_markdown() -> str:
    """The config reference table, generated from the field docs."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata.get("doc", "").replace("|", "\\|")  # keep the table intact
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {text} |")
    return "\n".join(lines)
