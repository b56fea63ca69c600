"""Run configuration: documented dataclasses, merged as defaults < YAML file < dotted overrides.

The defaults *are* the embedded tiny CPU run (`megatrain train` with no arguments). Each field's
``doc`` (and ``valid`` range, where it has one) becomes the config reference in the README
(``megatrain config --reference``). OmegaConf does the merging and the type checks, choices
included (fields typed with a ``Choice`` enum); ``validate`` checks the ranges and the cross-field
rules. Every error, a broken YAML file's included, is one line that names the key or file and the
fix. What the environment decides (the dataset's vocabulary, absolute paths, the per-rank batch)
is resolved once afterwards, by ``megatrain.spec.resolve``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatrain.errors import ConfigError


class Choice(str, enum.Enum):
    """A config value from a fixed set. Members are strings (``HeadType.linear == "linear"``) that
    print as their value; OmegaConf refuses anything else by name at load time."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def _choice(name: str, *values: str) -> type[Choice]:
    # the functional API: some values ("1f1b") are not identifiers; module and qualname let a
    # Config holding them pickle (submitit sends the config to the job that way)
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


HeadType = _choice("HeadType", "transformer", "linear", "causal", "anticausal", "replicated")
AttentionBackend = _choice("AttentionBackend", "sdpa", "xformers")
NormImpl = _choice("NormImpl", "torch", "apex")
LossImpl = _choice("LossImpl", "auto", "torch", "triton")
Optimizer = _choice("Optimizer", "adamw", "apex_fused_adam")
Device = _choice("Device", "auto", "cpu", "cuda")
DType = _choice("DType", "auto", "fp32", "bf16")
OverwriteMode = _choice("OverwriteMode", "refuse", "archive")
PPSchedule = _choice("PPSchedule", "gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
DPEngine = _choice("DPEngine", "fsdp", "deepspeed")
ActivationCheckpointing = _choice("ActivationCheckpointing", "none", "selective", "full")
MTPKind = _choice("MTPKind", "parallel", "sequential")
MTPConcat = _choice("MTPConcat", "embedding_first", "hidden_first")
HEAD_TYPES = HeadType.values()


def doc(default: Any, text: str, valid: str = "", **kwargs):
    """A dataclass field carrying its documentation and, for a number, its valid range.

    ``valid`` is ">= a", "> a" or an interval such as "[0, 1)"; ``validate`` enforces it (None
    passes where the field is Optional) and the reference table shows it.
    """
    metadata = {"doc": text, "valid": valid}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    n_layers: int = doc(6, "Transformer layers in total, heads included: the trunk gets "
                           "n_layers - n_future, the heads one each (parameter-matched, paper §2).",
                        valid=">= 1")
    n_future: int = doc(4, "Tokens predicted per position (1 + the extra heads or depths); head i "
                           "predicts token t+i. 1 = next-token Llama.", valid=">= 1")
    mtp_kind: MTPKind = doc(MTPKind.parallel,
                            "parallel (the paper's: n_future independent heads that replace "
                            "n_future - 1 trunk layers, parameter-matched) | sequential (DeepSeek-V3's: "
                            "D = n_future - 1 chained MTP modules on top of the full n_layers trunk; "
                            "depth k reads depth k-1's output and the embedding of token t+k; they ADD "
                            "parameters: embedding/hidden norms, a 2*dim x dim projection, a block and "
                            "a norm per depth).")
    mtp_concat: MTPConcat = doc(MTPConcat.embedding_first,
                                "sequential modules: the order of the projection's input, "
                                "embedding_first ([emb ; hidden]: DeepSeek-V3, Megatron, vLLM, "
                                "transformers' default) | hidden_first (MiMo).")
    head_type: HeadType = doc(HeadType.transformer, "transformer (independent heads, default) | linear "
                                        "(a dim x dim map per head on a full-depth trunk) | causal "
                                        "(head i reads head i-1) | anticausal (head i reads head i+1) | "
                                        "replicated (no head layers: a full-depth trunk and one "
                                        "unembedding per head, the paper's byte-level models).")
    dim: int = doc(128, "Model width.", valid=">= 1")
    n_heads: int = doc(4, "Attention heads.", valid=">= 1")
    n_kv_heads: int | None = doc(None, "Key/value heads for grouped-query attention (None = n_heads).",
                                 valid=">= 1")
    vocab_size: int = doc(0, "Vocabulary size; 0 = the dataset tokenizer's, rounded up to a "
                               "multiple of 64 (so tensor parallelism can split it).", valid=">= 0")
    ffn_dim_multiplier: float | None = doc(None, "Scales the SwiGLU hidden size (Llama convention).",
                                           valid="> 0")
    multiple_of: int = doc(64, "SwiGLU hidden size is rounded up to a multiple of this.", valid=">= 1")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.", valid="> 0")
    rope_theta: float = doc(10000.0, "RoPE base frequency.", valid="> 0")
    max_seq_len: int = doc(0, "Longest sequence RoPE is precomputed for; 0 = data.seq_len, otherwise "
                              "at least data.seq_len.", valid=">= 0")
    attention: AttentionBackend = doc(AttentionBackend.sdpa, "Attention kernel: sdpa (torch) | "
                                                             "xformers (GPU only).")
    norm_impl: NormImpl = doc(NormImpl.torch, "RMSNorm implementation: torch (nn.RMSNorm; fused by "
                                  "train.compile) | apex (NVIDIA apex's FusedRMSNorm, CUDA; apex is "
                                  "not on PyPI and must be built from source). Same parameter names.")
    init_std: float = doc(0.02, "Standard deviation of the weight initialisation.", valid="> 0")


@dataclass
class LossConfig:
    head_weights: list[float] = doc([], "Per-head loss weights, head 1 first, each >= 0 and not all 0; "
                                        "empty = 1 for head 1 and loss.extra_heads_weight for the "
                                        "others. A list given here wins over extra_heads_weight.")
    # Measured on the embedded default (2.3M parameters, 250 steps, docs/benchmarks.md): with the
    # paper's unweighted sum the three extra heads' losses, near the unigram entropy early on, pull
    # the shared 2-layer trunk toward predicting the unigram distribution, and head 1 ends 1.3 nats
    # behind a next-token model of the same size (5.87 vs 4.56); at 0.03 it ends level with it
    # (4.51) and heads 2..4 end better than under the plain sum too. With Adam a head's own layer
    # learns at the same speed whatever its weight: the weight only sets how much its loss shapes
    # the parameters the heads share (trunk, embedding, norm, unembedding).
    extra_heads_weight: float = doc(0.03, "Loss weight of heads 2..n relative to head 1. 1 = the "
                                          "paper's unweighted sum (the configs/paper/ models set it); "
                                          "the small default suits small models, where the extra "
                                          "heads' losses hold head 1 back.", valid=">= 0")
    ignore_index: int = doc(-100, "Target id that contributes no loss.")
    mask_cross_document: bool = doc(False, "Mask head i's target when an end-of-document token "
                                            "lies strictly between the input and the target.")
    impl: LossImpl = doc(LossImpl.auto, "fused_linear_cross_entropy implementation: auto | torch | triton.")
    mtp_lambda: float = doc(0.3, "model.mtp_kind=sequential: the depths' loss weight; the loss is "
                                 "L_main + (mtp_lambda / D) * sum of the D depths' losses (DeepSeek-V3: 0.3, "
                                 "later 0.1). loss.head_weights, when given, wins.", valid=">= 0")
    mtp_lambda_after: float = doc(0.1, "model.mtp_kind=sequential: mtp_lambda from "
                                       "loss.mtp_lambda_step on (recorded in config_history.jsonl).",
                                  valid=">= 0")
    mtp_lambda_step: int = doc(0, "The step from which loss.mtp_lambda_after replaces loss.mtp_lambda; "
                                  "0 = never.", valid=">= 0")


@dataclass
class MixtureSource:
    path: str = ""  # a prepared dataset folder
    weight: float = 1.0  # share of the training windows, relative to the other sources'


@dataclass
class DataConfig:
    path: str = doc("", "Prepared dataset folder (from `megatrain data prepare`); empty = build "
                        "the embedded stdlib corpus in data.cache_dir.")
    mixture: list[MixtureSource] = doc([], "Several prepared datasets with weights, e.g. "
                                           "[{path: A, weight: 0.7}, {path: B, weight: 0.3}]: windows are "
                                           "drawn in those proportions; one tokenizer for all. Replaces "
                                           "data.path (leave it empty).")
    cache_dir: str = doc("~/.cache/megatrain/stdlib", "Where the embedded default corpus is cached.")
    seq_len: int = doc(128, "Tokens per training sequence (inputs); windows hold seq_len + 1.")
    val_batches: int = doc(4, "Batches of the validation split per evaluation.", valid=">= 0")


@dataclass
class TrainConfig:
    steps: int = doc(250, "Optimizer steps.", valid=">= 0")
    batch_size: int = doc(16, "Global batch: sequences per optimizer step, whatever the layout.",
                          valid=">= 1")
    micro_batch_size: int = doc(0, "Sequences per rank per forward/backward; 0 = the whole "
                                   "per-rank batch. Gradient accumulation makes up the rest.", valid=">= 0")
    lr: float = doc(3e-3, "Peak learning rate.", valid="> 0")
    min_lr_ratio: float = doc(0.03, "Cosine decay ends at this fraction of the peak (paper: 3%).",
                              valid="[0, 1]")
    warmup_steps: int = doc(20, "Linear warmup steps.", valid=">= 0")
    weight_decay: float = doc(0.1, "AdamW weight decay (not applied to norms).", valid=">= 0")
    beta1: float = doc(0.9, "AdamW beta1.", valid="[0, 1)")
    beta2: float = doc(0.95, "AdamW beta2.", valid="[0, 1)")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 = no clipping.", valid=">= 0")
    # numpy's generator (the data order) refuses a negative seed
    seed: int = doc(0, "Seed for initialisation and data order.", valid=">= 0")
    deterministic: bool = doc(True, "Deterministic algorithms (bit-exact resume on CPU).")
    device: Device = doc(Device.auto, "auto (cuda if available) | cpu | cuda.")
    dtype: DType = doc(DType.auto, "Autocast dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16.")
    eval_every: int = doc(50, "Validation every this many steps; 0 = never.", valid=">= 0")
    max_bad_steps: int = doc(3, "Stop after this many consecutive NaN/inf steps (none applied).",
                             valid=">= 1")
    threads: int = doc(0, "CPU threads for torch; 0 = torch's default.", valid=">= 0")
    compile: bool = doc(False, "torch.compile every transformer block (trunk and heads); not "
                               "with parallel.sequence_parallel.")
    optimizer: Optimizer = doc(Optimizer.adamw,
                               "adamw (torch's AdamW, fused on CUDA) | apex_fused_adam (NVIDIA "
                                  "apex's FusedAdam in AdamW mode, CUDA only; apex must be built "
                                  "from source; its optimizer state is laid out differently, so "
                                  "resume with the same choice).")


@dataclass
class CheckpointConfig:
    every: int = doc(50, "Save a checkpoint every this many steps (and at the end); 0 = only at the end.",
                     valid=">= 0")
    keep: int = doc(2, "How many checkpoints to keep.", valid=">= 1")
    resume: bool = doc(True, "Resume from the latest checkpoint in run.dir if there is one.")
    load_step: int = doc(0, "Resume from the checkpoint of this step instead of the newest (rewind, "
                            "e.g. after a loss blow-up); later checkpoints are archived, not deleted. "
                            "0 = the newest intact one.", valid=">= 0")
    async_save: bool = doc(False, "Write checkpoints in a background thread on a process group of "
                                  "their own; 'latest' moves once every rank has written.")


@dataclass
class LoggingConfig:
    every: int = doc(1, "Log metrics every this many steps.", valid=">= 1")
    tensorboard: bool = doc(True, "Write TensorBoard event files to run.dir/tensorboard.")
    progress: bool = doc(True, "Show a progress bar.")


@dataclass
class RunConfig:
    dir: str = doc("runs/default", "Run directory: config, metrics, TensorBoard, checkpoints.")
    overwrite: OverwriteMode = doc(OverwriteMode.refuse,
                                   "What a fresh start (checkpoint.resume=false, or no usable "
                                   "checkpoint) does in a run.dir that already holds checkpoints: "
                                   "refuse (default) stops with an error; archive moves the old run "
                                   "aside to `run.dir/archive/<timestamp>/` first. Nothing is ever deleted.")


@dataclass
class InitConfig:
    # Named ``path``, not ``from`` as issue 10 spells it: ``from`` is a Python keyword, so no
    # dataclass field (and hence no OmegaConf key of a structured config) can carry that name.
    path: str = doc("", "Start a fresh run from the weights of a run directory (its newest intact "
                        "checkpoint), one of its checkpoints/step_N folders, or a `megatrain export "
                        "--format meta` folder (or Meta's own release: consolidated.pth + params.json) "
                        "instead of the random initialisation. The trunk and widths must match the "
                        "source; model.n_future may differ: fewer heads keep the trunk and heads "
                        "1..n (n=1: the paper's n'=1 finetuning), extra heads start from the model's "
                        "own init. The optimizer state starts fresh. A resume ignores it (the "
                        "checkpoint wins). Empty = random initialisation. `init.from=` is accepted "
                        "as an override alias.")


# Override spellings that cannot be field names: the issue's `init.from` (a Python keyword).
OVERRIDE_ALIASES = {"init.from": "init.path"}


@dataclass
class ParallelConfig:
    dp: int = doc(1, "Data-parallel degree (FSDP2 shards parameters, gradients and optimizer state "
                     "over these ranks). dp * tp * pp must equal the number of processes.",
                  valid=">= 1")
    tp: int = doc(1, "Tensor-parallel degree: attention heads, SwiGLU hidden units and the "
                     "vocabulary are split over this many ranks. Must divide model.n_heads, "
                     "model.n_kv_heads and model.vocab_size; keep it within one node.",
                  valid=">= 1")
    pp: int = doc(1, "Pipeline-parallel degree: ranks that each hold a contiguous slice of the "
                     "trunk. The last pipeline rank holds every MTP head, the norm, the unembedding "
                     "and the loss.", valid=">= 1")
    pp_schedule: PPSchedule = doc(PPSchedule["1f1b"], "Pipeline schedule: gpipe | 1f1b | interleaved_1f1b "
                                   "(parallel.virtual_stages per rank) | zbv | dualpipev "
                                   "(V-shaped: 2 stages per rank).")
    microbatches: int = doc(0, "Pipeline microbatches per step and data-parallel rank; 0 = the "
                               "per-rank batch / train.micro_batch_size (or the number of pipeline "
                               "stages when micro_batch_size is 0). Only used when pp > 1.",
                            valid=">= 0")
    virtual_stages: int = doc(2, "Stages per pipeline rank for interleaved_1f1b (zbv and dualpipev "
                                 "always use 2; gpipe and 1f1b always 1).", valid=">= 1")
    stage_layers: list[int] = doc([], "Trunk layers per pipeline stage, first stage first, e.g. "
                                      "[3, 2, 1]; must sum to the trunk's layer count. Empty = "
                                      "balanced automatically (a head costs a layer plus its "
                                      "unembedding).")
    sequence_parallel: bool = doc(False, "With tp > 1, also shard the trunk's norms and residual "
                                         "stream along the sequence (less activation memory).")
    dp_engine: DPEngine = doc(DPEngine.fsdp, "Data-parallel engine: fsdp (FSDP2, composes with tp and pp) | "
                                 "deepspeed (ZeRO, dp only).")
    zero_stage: int = doc(3, "DeepSpeed ZeRO stage 1 | 2 | 3 (parallel.dp_engine=deepspeed only).",
                          valid="[1, 3]")
    offload_optimizer: bool = doc(False, "DeepSpeed ZeRO-Offload: keep the fp32 master weights and "
                                         "AdamW state in CPU memory and step them there "
                                         "(parallel.dp_engine=deepspeed with zero_stage 2 or 3).")
    activation_checkpointing: ActivationCheckpointing = doc(
        ActivationCheckpointing.none, "none | selective (every other trunk layer) | full (every trunk "
                                      "layer).")


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
    init: InitConfig = field(default_factory=InitConfig)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        known = _known_keys(section)
        return ConfigError(f"{source}: unknown config key '{key}'. Known keys"
                           f"{' in ' + section if section else ''}: {', '.join(known)}")
    if "expected one of" in msg:  # a Choice field: the message lists what is allowed
        return ConfigError(f"{source}: bad value for '{key}': {msg}; set it to one of those.")
    return ConfigError(f"{source}: bad value for '{key}': {msg}. "
                       f"See `megatrain config --reference` for the field's type.")


def _known_keys(section: str) -> list[str]:
    node = Config()
    for part in [p for p in section.split(".") if p]:
        node = getattr(node, part, None)
        if node is None or not dataclasses.is_dataclass(node):
            return [f.name for f in dataclasses.fields(Config)]
    return [f.name for f in dataclasses.fields(node)]


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one clause: the problem, where, and what it was inside."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    inside = f" ({context})" if context else ""
    return f"{problem}{where}{inside}"


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file at ``path`` as a mapping of sections; anything else is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                          f"offset {err.start}); pass a YAML text file to --config (see configs/).") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); pass a readable YAML "
                          f"file to --config (see configs/).") from None
    example = "e.g. `train: {steps: 100}` (see configs/tiny.yaml)"
    try:
        # The document's shape before OmegaConf reads it: on a list it raises a merge TypeError, on
        # a number an assertion, and it turns a lone string into a key.
        top = yaml.compose(text, Loader=yaml.SafeLoader)
        if top is not None and not _is_null(top) and not isinstance(top, yaml.MappingNode):
            raise ConfigError(f"config file {path} holds {_describe_node(top)} at the top level; a "
                              f"config is a mapping of sections to keys, {example}.")
        loaded = OmegaConf.create(text)  # its loader also rejects duplicate keys
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}; fix the "
                          f"syntax, {example}.") from None
    if not isinstance(top, yaml.MappingNode):
        return loaded  # empty, or only comments
    sections = {f.name for f in dataclasses.fields(Config)}
    for key, value in top.value:
        if key.value not in sections or isinstance(value, yaml.MappingNode):
            continue  # an unknown section is named by the merge, with the known ones
        if _is_null(value):  # `train:` with every key under it commented out
            del loaded[key.value]
            continue
        raise ConfigError(f"config file {path}: section '{key.value}' holds {_describe_node(value)} at "
                          f"line {value.start_mark.line + 1}, not {key.value}.* keys; write them "
                          f"indented under '{key.value}:', {example}.")
    return loaded


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _describe_node(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the single value {node.value[:40]!r}"


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``key=value`` overrides, validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                              f"to --config (see configs/).")
        try:
            merged = OmegaConf.merge(merged, _read_yaml(path))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100).")
        key = item.split("=", 1)[0]
        if key in OVERRIDE_ALIASES:
            key = OVERRIDE_ALIASES[key]
            item = key + item[item.index("="):]
        if "." not in key:
            raise ConfigError(f"override '{item}': keys are dotted section.field, e.g. train.steps=100.")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)}); "
                              f"quote it or fix its brackets, e.g. loss.head_weights=[1,0.5].") from None
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _within(value: float, valid: str) -> bool:
    """Whether ``value`` lies in ``valid``: ">= a", "> a" or an interval like "[0, 1)"."""
    if isinstance(value, float) and not math.isfinite(value):
        return False  # nan compares false anyway; inf is never meant
    if valid.startswith(">="):
        return value >= float(valid[2:])
    if valid.startswith(">"):
        return value > float(valid[1:])
    low, high = (float(end) for end in valid[1:-1].split(","))
    above = low <= value if valid[0] == "[" else low < value
    below = value <= high if valid[-1] == "]" else value < high
    return above and below


def _check_ranges(cfg: Config) -> None:
    """Every field's ``valid`` range; checked first, so no cross-field rule divides by zero."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            valid, value = f.metadata.get("valid"), getattr(values, f.name)
            if not valid or value is None or _within(value, valid):
                continue
            key = f"{section.name}.{f.name}"
            rule = valid if valid[0] in "<>" else f"in {valid}"
            if isinstance(value, float) and not math.isfinite(value):
                rule = f"finite and {rule}"
            default = "null" if f.default is None else repr(f.default)  # as YAML and overrides spell it
            raise ConfigError(f"{key}={value!r} is out of range: it must be {rule}; set it within that "
                              f"range, e.g. the default {default}. {key}: {f.metadata['doc']}")


def _check_choices(cfg: Config) -> None:
    """Every ``Choice`` field holds one of its values. A loaded config always does (OmegaConf
    refuses the rest); this catches a dataclass built in code with a bad string."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            kind, value = f.type, getattr(values, f.name)
            kind = globals().get(kind, kind) if isinstance(kind, str) else kind  # postponed annotations
            if isinstance(kind, type) and issubclass(kind, Choice) and value not in kind.values():
                raise ConfigError(f"{section.name}.{f.name}={value!r} is not one of "
                                  f"{', '.join(kind.values())}; {f.metadata['doc']}")


def validate(cfg: Config) -> None:
    """Ranges, choices and cross-field rules; each failure names the keys, the bad value and the fix."""
    _check_ranges(cfg)
    _check_choices(cfg)
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.norm_impl == "apex" and cfg.parallel.sequence_parallel:
        raise ConfigError("model.norm_impl=apex with parallel.sequence_parallel=true is not "
                          "supported (sequence parallelism makes the norms' weights DTensors, "
                          "which apex's fused kernel does not take); set one of them back to its "
                          "default (model.norm_impl=torch or parallel.sequence_parallel=false)")
    if m.mtp_kind == "sequential" and m.head_type != "transformer":
        raise ConfigError(f"model.mtp_kind=sequential with model.head_type={m.head_type}: the sequential "
                          f"modules are chained transformer blocks of their own, so no head type "
                          f"applies; leave model.head_type=transformer, or use model.mtp_kind=parallel")
    if m.mtp_kind == "parallel" and m.head_type not in ("linear", "replicated") and m.n_future >= m.n_layers:
        raise ConfigError(f"model.n_future={m.n_future} must be smaller than model.n_layers="
                          f"{m.n_layers}: the heads take n_future of the layers and the trunk "
                          f"needs at least one. Raise model.n_layers or lower model.n_future.")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}.")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even for RoPE.")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv}.")
    if d.seq_len <= m.n_future:
        raise ConfigError(f"data.seq_len={d.seq_len} must be larger than model.n_future="
                          f"{m.n_future}, or head {m.n_future} has no target in the window.")
    if d.mixture and d.path:
        raise ConfigError(f"data.path={d.path!r} and data.mixture are both set; a mixture names all its "
                          "datasets: leave data.path empty (or put it in the mixture).")
    for i, source in enumerate(d.mixture):
        if not source.path or not math.isfinite(source.weight) or source.weight <= 0:
            raise ConfigError(f"data.mixture[{i}] = {{path: {source.path!r}, weight: {source.weight}}}: "
                              "each source needs a dataset path and a weight > 0.")
    if m.max_seq_len and m.max_seq_len < d.seq_len:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} is below data.seq_len={d.seq_len}: the RoPE "
                          f"tables would not cover a training sequence. Set model.max_seq_len >= "
                          f"{d.seq_len}, or 0 (= data.seq_len).")
    weights = cfg.loss.head_weights
    if weights and len(weights) != m.n_future:
        raise ConfigError(f"loss.head_weights has {len(weights)} entries but "
                          f"model.n_future={m.n_future}; give one weight per head or leave it empty.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or (weights and not any(weights)):
        raise ConfigError(f"loss.head_weights={list(weights)} must be finite and >= 0, at least one "
                          f"of them > 0 (all 0 trains nothing); fix them or leave the list empty "
                          f"(= 1 for head 1, loss.extra_heads_weight for the others).")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}.")
    if t.compile and cfg.parallel.sequence_parallel:
        raise ConfigError("train.compile=true with parallel.sequence_parallel=true is not supported "
                          "(per-block compiled backward fails under sequence parallelism in torch "
                          "2.13); set one of them to false")
    if not cfg.run.dir:
        raise ConfigError("run.dir is empty; give a run directory, e.g. run.dir=runs/my_run.")


def predates_extra_heads_weight(saved_config: Path) -> bool:
    """Whether a run's or checkpoint's saved config.yaml was written before
    ``loss.extra_heads_weight`` existed: such a run summed its heads' losses unweighted."""
    loss = (yaml.safe_load(Path(saved_config).read_text()) or {}).get("loss") or {}
    return "extra_heads_weight" not in loss


def load_saved_config(path: str | Path) -> Config:
    """A config a run or checkpoint saved, read as that run trained: one that predates
    ``loss.extra_heads_weight`` gets 1 (the unweighted sum it used), not today's default."""
    cfg = load_config(path)
    if predates_extra_heads_weight(path):
        cfg.loss.extra_heads_weight = 1.0
    return cfg


def mtp_lambda_at(loss: LossConfig, step: int) -> float:
    """The sequential modules' weight λ at ``step`` (0-based: the step being computed)."""
    if loss.mtp_lambda_step and step >= loss.mtp_lambda_step:
        return float(loss.mtp_lambda_after)
    return float(loss.mtp_lambda)


def head_loss_weights(cfg: Config, step: int = 0) -> list[float]:
    """Each head's (or depth's) loss weight at ``step``, head 1 first: ``loss.head_weights`` when
    given; else 1 for head 1 and ``loss.extra_heads_weight`` for heads 2..n (parallel heads), or
    λ / D for each of the D sequential depths."""
    if cfg.loss.head_weights:
        return [float(w) for w in cfg.loss.head_weights]
    extra = cfg.model.n_future - 1
    if cfg.model.mtp_kind == "sequential":  # D = 0 (the modules dropped, e.g. to finetune): head 1
        return [1.0] + [mtp_lambda_at(cfg.loss, step) / extra] * extra if extra else [1.0]
    return [1.0] + [float(cfg.loss.extra_heads_weight)] * extra


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def reference_markdown() -> str:
    """The config reference table, generated from the field docs and ranges."""
    lines = ["| key | default | valid | meaning |", "|---|---|---|---|"]
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f.metadata.get("doc", "").replace("|", "\\|")  # keep the table intact
            valid = f"`{f.metadata['valid']}`" if f.metadata.get("valid") else ""
            if isinstance(default, Choice):
                valid = " \\| ".join(f"`{v}`" for v in type(default).values())
                default = default.value
            lines.append(f"| `{section.name}.{f.name}` | `{default!r}` | {valid} | {text} |")
    return "\n".join(lines)
