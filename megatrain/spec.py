"""A config resolved once: ``resolve(cfg) -> RunSpec``, what every command takes.

Loading a config (megatrain.config) checks each key and the rules between keys. Resolving it
settles what the config leaves to the environment, once, in this one place: absolute paths (a
SLURM job starts in another directory), the training data's folder (the embedded corpus is built
when it is the one meant), the vocabulary (``model.vocab_size=0`` = the dataset's, rounded), the
RoPE length, the per-rank and per-forward batch, the heads' loss weights and the validated
parallel layout. Nothing changes the config afterwards: ``RunSpec.config`` is the resolved copy
and the caller's object is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from megatrain.config import Config, LossConfig, head_loss_weights, predates_extra_heads_weight, validate
from megatrain.errors import ConfigError
from megatrain.parallel.pipeline_layout import resolve_microbatches
from megatrain.parallel.topology import ParallelDims
from megatrain.run_dir import RunDir

# model.vocab_size=0 takes the tokenizer's size rounded up to a multiple of this (Megatron's
# padding): tensor parallelism can split it and GPU matmuls stay aligned, whatever the layout.
VOCAB_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run is, fully resolved. Read ``config`` for the keys themselves; do not change it."""

    config: Config
    run_dir: RunDir  # absolute
    dataset_dir: Path | None  # absolute; a mixture's first source (they share the tokenizer)
    vocab_size: int  # == config.model.vocab_size
    max_seq_len: int  # RoPE positions: model.max_seq_len, or data.seq_len
    world_size: int  # dp * tp * pp
    local_batch: int  # sequences per data-parallel rank per optimizer step
    micro_batch: int  # sequences per forward/backward of one rank (gradient accumulation: the rest)
    head_weights: tuple[float, ...]  # each head's loss weight, head 1 first
    stage_layers: tuple[int, ...] = ()  # trunk layers per pipeline stage (pp > 1)
    pipeline_microbatches: int = 1  # per step and data-parallel rank (pp > 1)
    notes: tuple[str, ...] = ()  # what resolving decided that the user should hear

    @property
    def forwards_per_step(self) -> int:
        """Forwards (microbatches) of one rank per optimizer step."""
        return self.local_batch // self.micro_batch

    @property
    def dims(self) -> ParallelDims:
        p = self.config.parallel
        return ParallelDims(p.dp, p.tp, p.pp, self.world_size)

    def device(self, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
        """``train.device`` and ``train.dtype`` on this machine: the device and the autocast dtype
        (None = float32, no autocast)."""
        t = self.config.train
        want = t.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        device = torch.device(want, local_rank) if want == "cuda" else torch.device(want)
        dtype = t.dtype
        if dtype == "auto":
            dtype = "bf16" if device.type == "cuda" else "fp32"
        return device, (torch.bfloat16 if dtype == "bf16" else None)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose paths (run.dir, data.path, data.mixture, data.cache_dir, init.path)
    are absolute, against the current directory: the config then means the same from anywhere."""
    cfg = copy.deepcopy(cfg)
    cfg.run.dir = _absolute(cfg.run.dir)
    cfg.data.path = _absolute(cfg.data.path)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir)
    for source in cfg.data.mixture:
        source.path = _absolute(source.path)
    cfg.init.path = _absolute(cfg.init.path)
    return cfg


def dataset_dir_of(cfg: Config, *, build: bool = True) -> Path:
    """The training data's folder: ``data.path``, a mixture's first source (the sources share the
    tokenizer), or the embedded default corpus (built into ``data.cache_dir`` when ``build``)."""
    if cfg.data.mixture:
        return Path(cfg.data.mixture[0].path).expanduser()
    if cfg.data.path:
        return Path(cfg.data.path).expanduser()
    from megatrain.data_pipelines.prepare import default_dataset_dir, ensure_default_dataset

    cache = Path(cfg.data.cache_dir).expanduser()
    return Path(ensure_default_dataset(cache)) if build else default_dataset_dir(cache)


def trained_length(cfg: Config) -> int:
    """The positions RoPE covers in training: ``model.max_seq_len``, or ``data.seq_len`` (0)."""
    return cfg.model.max_seq_len or cfg.data.seq_len


def padded_vocab(tokenizer_vocab: int) -> int:
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _vocab_size(cfg: Config, tokenizer_vocab: int, where: str) -> int:
    if cfg.model.vocab_size == 0:
        return padded_vocab(tokenizer_vocab)
    if cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} ({where}); set model.vocab_size="
                          f"{tokenizer_vocab} or 0 (= from the dataset)")
    return cfg.model.vocab_size


def _tokenizer_vocab(cfg: Config, dataset_dir: Path, data: str) -> tuple[int | None, str]:
    """The training data's tokenizer size and where it comes from; None when a plan's dataset is
    not on this host (``model.vocab_size`` then stands unchecked)."""
    from megatrain.data.shards import read_manifest

    named = bool(cfg.data.path or cfg.data.mixture)
    if (dataset_dir / "manifest.json").is_file() or data == "build" or (named and dataset_dir.exists()):
        return int(read_manifest(dataset_dir)["vocab_size"]), str(dataset_dir)
    if not named:  # the embedded corpus, not built yet: its tokenizer's size is part of its definition
        from megatrain.data_pipelines.prepare import DEFAULT_CORPUS_VOCAB_SIZE

        return DEFAULT_CORPUS_VOCAB_SIZE, "the embedded default corpus"
    if cfg.model.vocab_size:
        return None, "not on this host"
    return int(read_manifest(dataset_dir)["vocab_size"]), str(dataset_dir)  # names what is missing


def _loss_weights_of_an_older_run(cfg: Config, run_dir: RunDir) -> str | None:
    """A run started before ``loss.extra_heads_weight`` existed summed its heads' losses unweighted:
    resumed under today's default (0.03) its loss would change mid-run, so it keeps 1 unless the
    command asks for a weight (a value other than the default, or ``loss.head_weights``). Sets it
    in ``cfg`` (the resolving copy) and returns the note to print, or None."""
    saved = run_dir.config_path
    if not saved.is_file() or not predates_extra_heads_weight(saved):
        return None
    if cfg.loss.head_weights or cfg.loss.extra_heads_weight != LossConfig.extra_heads_weight:
        return None
    cfg.loss.extra_heads_weight = 1.0
    return ("this run started before loss.extra_heads_weight existed, with the heads' losses summed "
            "unweighted: it continues so (loss.extra_heads_weight=1); pass another value to change that")


# Keys that only a start without a checkpoint uses (init.path: the initial weights). A resume keeps
# the run's own value, so that config.yaml and its history never record a change nobody applies.
FRESH_START_KEYS = ("init.path",)


def _fresh_start_keys_of_a_resumed_run(cfg: Config, run_dir: RunDir) -> list[str]:
    """On a resume from a checkpoint, set each of ``FRESH_START_KEYS`` that the command changed
    back to the run's value in ``cfg`` (the resolving copy); returns the notes to print."""
    if not (cfg.checkpoint.resume and run_dir.has_checkpoints()):
        return []
    saved, notes = run_dir.saved_config_tree() or {}, []
    for key in FRESH_START_KEYS:
        section, name = key.split(".")
        given = getattr(getattr(cfg, section), name)
        kept = (saved.get(section) or {}).get(name, getattr(getattr(Config(), section), name))
        if given != kept:
            setattr(getattr(cfg, section), name, kept)
            notes.append(f"{key}={given!r} is not used: this run resumes from its checkpoint and keeps "
                         f"{key}={kept!r} (it is read by a start without a checkpoint only)")
    return notes


DATA_MODES = ("build", "existing", "none")


def resolve(cfg: Config, *, world_size: int | None = None, data: str = "build") -> RunSpec:
    """Resolve ``cfg`` for a run of ``world_size`` processes (default: the product of its degrees).

    ``data``: "build" (a run: the embedded corpus is built if it is the data and missing),
    "existing" (a plan: never builds, and a dataset not on this host is fine when
    ``model.vocab_size`` is given; the vocabulary of an embedded corpus not built yet comes from
    the corpus's definition), "none" (no data at all, e.g. a benchmark on random tokens:
    ``model.vocab_size`` must be given; ``dataset_dir`` is None).
    Raises ConfigError / DataError naming the key and the fix."""
    if data not in DATA_MODES:
        raise ValueError(f"data={data!r} is not one of {DATA_MODES}")
    cfg = with_absolute_paths(cfg)
    run_dir = RunDir(cfg.run.dir)
    dataset_dir = None
    if data == "none":
        if not cfg.model.vocab_size:
            raise ConfigError("model.vocab_size=0 means 'the dataset's', and this command reads no "
                              "dataset: set model.vocab_size")
    else:
        dataset_dir = dataset_dir_of(cfg, build=data == "build").absolute()
        tokenizer_vocab, where = _tokenizer_vocab(cfg, dataset_dir, data)
        if tokenizer_vocab is not None:  # else: planning for a cluster whose data this host lacks
            cfg.model.vocab_size = _vocab_size(cfg, tokenizer_vocab, where)
    notes = [note for note in [_loss_weights_of_an_older_run(cfg, run_dir)] if note]
    notes += _fresh_start_keys_of_a_resumed_run(cfg, run_dir)
    validate(cfg)  # again: the vocabulary is now known (tp must divide it)
    p, t = cfg.parallel, cfg.train
    dims = ParallelDims(p.dp, p.tp, p.pp, world_size or p.dp * p.tp * p.pp)
    # every layout check here, before any collective
    stage_layers = tuple(dims.validate(cfg.model, p, t.batch_size, t.micro_batch_size))
    local_batch = t.batch_size // p.dp
    microbatches = resolve_microbatches(p, p.pp, local_batch, t.micro_batch_size) if p.pp > 1 else 1
    micro_batch = local_batch // microbatches if p.pp > 1 else (t.micro_batch_size or local_batch)
    return RunSpec(config=cfg, run_dir=run_dir, dataset_dir=dataset_dir,
                   vocab_size=cfg.model.vocab_size, max_seq_len=trained_length(cfg),
                   world_size=dims.world_size, local_batch=local_batch, micro_batch=micro_batch,
                   head_weights=tuple(head_loss_weights(cfg)), stage_layers=stage_layers,
                   pipeline_microbatches=microbatches, notes=tuple(notes))
