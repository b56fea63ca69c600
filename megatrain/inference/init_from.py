"""``init.path`` (the issue's ``init.from``): the weights a fresh run starts from.

The source is a Meta-format export (``params.json`` + ``consolidated.pth``), a megatrain Hugging
Face export (``--format hf`` / ``deepseek-mtp``: ``config.json`` records megatrain's model config),
a run directory (its newest intact checkpoint) or one of its checkpoint folders
(``RUN_DIR/checkpoints/step_N``). The new model may have another number of heads (or sequential
depths) than the source, as long as the trunk and the MTP kind are the same:

- same n_future: every weight is copied;
- fewer heads (the paper's n'=1 finetuning of an n=4 model): the trunk and heads 1..n' are
  copied, the source's other heads are dropped. With parameter matching this means
  ``model.n_layers`` = source trunk + n': for n'=1 the new model *is* the source's trunk + head 1,
  which in Meta's layout (model/layout.py) is simply the last entry of ``layers``;
- more heads: the trunk and the source's heads are copied, the new heads take the model's own
  initial values (``initial_value``: a function of the name and train.seed, as in a random start).

Everything else (dim, attention heads, vocabulary, SwiGLU width, trunk depth) must match; the
refusal names the model.* key and the value that fits. The optimizer always starts fresh (the
trainer never reads the source's optimizer section).

The weights come back as a lazy mapping: a rank that materialises only its shards reads only the
source tensors it needs (an export is memory-mapped; a checkpoint is read one tensor at a time),
so no rank holds the whole model at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megatrain.checkpoint import quiet_single_process
from megatrain.checkpoint_integrity import problem_of, unverified_warning
from megatrain.config import ModelConfig
from megatrain.errors import CheckpointError, ConfigError
from megatrain.inference.load import MODEL_KEY, checkpoint_folder, config_of
from megatrain.inference.meta_format import PARAMS_FILE, WEIGHTS_FILE, read_meta
from megatrain.model.layout import LayerLayout
from megatrain.model.mtp import MTPTransformer, initial_value
from megatrain.model.transformer import ffn_hidden_dim
from megatrain.run_dir import CONFIG_FILE, RunDir

# Keys that set the shapes of every weight besides the layer count (the SwiGLU width is compared
# separately: it follows from multiple_of and ffn_dim_multiplier together).
WIDTH_FIELDS = ("dim", "n_heads", "n_kv_heads", "vocab_size")


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's name and shape in a model of ``cfg``, without allocating it."""
    with torch.device("meta"):
        return {name: p.shape for name, p in MTPTransformer(cfg, max_seq_len=1).state_dict().items()}


class InitWeights(Mapping[str, torch.Tensor]):
    """The new model's initial weights by parameter name, each read from the source (or computed,
    for a head the source lacks) when it is asked for. ``summary`` says what came from where."""

    def __init__(self, sources: dict[str, str | None], read: Callable[[str], torch.Tensor],
                 cfg: ModelConfig, seed: int, shapes: dict[str, torch.Size], summary: str):
        self._sources, self._read, self._cfg, self._seed = sources, read, cfg, seed
        self._shapes = shapes
        self.summary = summary

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        if source is None:  # a head the source does not have: the model's own initialisation
            return initial_value(name, self._shapes[name], self._cfg, self._seed)
        return self._read(source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def source_names(ours: LayerLayout, theirs: LayerLayout, names) -> dict[str, str | None]:
    """For each of our parameter names, the source's name of the same weight (None: a new head).

    Our head i reads the source's head i; every other part (embedding, trunk layers, norm,
    unembedding) keeps its name, since the trunks have the same depth."""
    prefixes = [(ours.head_path(i) + ".", i) for i in range(ours.n_future) if ours.head_path(i)]
    prefixes += [(path + ".", i) for i, path in enumerate(ours.extra_unembedding_paths, 1)]
    mapping = {}
    for name in names:
        head = next(((prefix, i) for prefix, i in prefixes if name.startswith(prefix)), None)
        if head is None:
            mapping[name] = name
        elif head[1] < theirs.n_future:
            own = theirs.unembedding_path(head[1]) if theirs.replicated else theirs.head_path(head[1])
            mapping[name] = own + "." + name[len(head[0]):]
        else:
            mapping[name] = None
    return mapping


def _head_modules(cfg: ModelConfig) -> str:
    """What a head is made of, for the kinds whose weights can pass from one to the other."""
    layout = LayerLayout.of(cfg)
    if layout.replicated:
        return "one unembedding per head on a full-depth trunk"
    if cfg.head_type == "linear" and not layout.sequential:
        return "a dim x dim map per head on a full-depth trunk"
    return "transformer blocks"


def check_compatible(ours: ModelConfig, theirs: ModelConfig, source: str) -> None:
    """Refuse a model whose trunk or widths differ from the source's; the message names the first
    differing model.* key and the value that fits."""
    if ours.mtp_kind != theirs.mtp_kind:
        raise ConfigError(f"model.mtp_kind={ours.mtp_kind} cannot start from {source}, whose "
                          f"multi-token heads are {theirs.mtp_kind} (other modules, other names); set "
                          f"model.mtp_kind={theirs.mtp_kind}")
    if _head_modules(ours) != _head_modules(theirs):
        raise ConfigError(f"model.head_type={ours.head_type} cannot start from {source}, which has "
                          f"{theirs.head_type} heads ({_head_modules(ours)} here, {_head_modules(theirs)} "
                          f"there); set model.head_type={theirs.head_type}")
    for field in WIDTH_FIELDS:
        mine, other = getattr(ours, field), getattr(theirs, field)
        if field == "n_kv_heads":  # None means "= n_heads" on both sides
            mine, other = mine or ours.n_heads, other or theirs.n_heads
        if mine != other:
            raise ConfigError(f"model.{field}={mine} does not match {source} ({field}={other}); set "
                              f"model.{field}={other} to start from its weights")
    if ffn_hidden_dim(ours) != ffn_hidden_dim(theirs):
        raise ConfigError(f"model.multiple_of={ours.multiple_of} and model.ffn_dim_multiplier="
                          f"{ours.ffn_dim_multiplier} give a SwiGLU width of {ffn_hidden_dim(ours)}, but "
                          f"{source} has {ffn_hidden_dim(theirs)} (multiple_of={theirs.multiple_of}, "
                          f"ffn_dim_multiplier={theirs.ffn_dim_multiplier}); set model.multiple_of="
                          f"{theirs.multiple_of} model.ffn_dim_multiplier="
                          f"{'null' if theirs.ffn_dim_multiplier is None else theirs.ffn_dim_multiplier}")
    trunk, their_trunk = LayerLayout.of(ours).n_trunk_layers, LayerLayout.of(theirs).n_trunk_layers
    if trunk != their_trunk:
        full = not LayerLayout.of(ours).heads_are_blocks  # no head takes a trunk layer
        fits = their_trunk + (0 if full else ours.n_future)
        raise ConfigError(f"model.n_layers={ours.n_layers} with model.n_future={ours.n_future} gives a "
                          f"trunk of {trunk} layers, but {source} has {their_trunk} (n_layers="
                          f"{theirs.n_layers}, n_future={theirs.n_future}); set model.n_layers={fits} "
                          f"to keep its trunk with {ours.n_future} head(s) (or model.n_future="
                          f"{theirs.n_future} model.n_layers={theirs.n_layers} to keep every weight)")


def _heads(first: int, last: int) -> str:
    return f"head {first}" if first == last else f"heads {first}..{last}"


def _describe(path: str, ours: ModelConfig, theirs: ModelConfig) -> str:
    kept = min(ours.n_future, theirs.n_future)
    parts = [f"trunk and {_heads(1, kept)} from {path}"]
    if theirs.n_future > ours.n_future:
        parts.append(f"its {_heads(kept + 1, theirs.n_future)} dropped")
    if ours.n_future > theirs.n_future:
        parts.append(f"{_heads(kept + 1, ours.n_future)} freshly initialised")
    return ", ".join(parts)


def _read_export(path: Path) -> tuple[Callable[[str], torch.Tensor], dict[str, torch.Size], ModelConfig, str]:
    state, theirs = read_meta(path)
    label = f"init.path={path} ({PARAMS_FILE})"
    return state.__getitem__, {name: t.shape for name, t in state.items()}, theirs, label


def _read_checkpoint(folder: Path) -> tuple[Callable[[str], torch.Tensor], dict[str, torch.Size],
                                            ModelConfig, str]:
    theirs = config_of(folder).model
    shapes = parameter_shapes(theirs)

    def read(name: str) -> torch.Tensor:
        tensor = torch.empty(shapes[name])
        try:  # no_dist: every rank reads on its own, whenever it needs a tensor
            with quiet_single_process():
                dcp.load({MODEL_KEY[0]: {MODEL_KEY[1]: {name: tensor}}}, checkpoint_id=str(folder),
                         no_dist=True)
        except Exception as err:  # noqa: BLE001 - any DCP failure is "cannot load", with its cause
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise CheckpointError(f"init.path: cannot read {name} from {folder}: {lines[-1]}") from err
        return tensor

    return read, shapes, theirs, f"init.path={folder} (its {CONFIG_FILE})"


def _read_hf_export(folder: Path):
    """A megatrain ``--format hf`` / ``deepseek-mtp`` export: its config.json's ``megatrain_model``,
    the trunk (+ MTP layers) from model.safetensors by HF name, parallel heads 2..n from
    extra_heads.safetensors by ours; memory-mapped, read a tensor at a time."""
    import json

    from safetensors import safe_open

    from megatrain.inference.export import (
        HF_EXTRA_HEADS_FILE,
        HF_WEIGHTS_FILE,
        hf_names,
        rope_rows_from_hf,
    )

    label = f"init.path={folder} (config.json)"
    try:
        theirs = ModelConfig(**json.loads((folder / "config.json").read_text())["megatrain_model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{label} is not a megatrain export (no readable megatrain_model in "
                              f"config.json: {err}); give a folder written by `megatrain export`") from None
    names = hf_names(theirs)
    files = {HF_WEIGHTS_FILE: safe_open(str(folder / HF_WEIGHTS_FILE), "pt")}
    if (folder / HF_EXTRA_HEADS_FILE).is_file():
        files[HF_EXTRA_HEADS_FILE] = safe_open(str(folder / HF_EXTRA_HEADS_FILE), "pt")
    where = {name: (files[HF_WEIGHTS_FILE], hf, heads) for name, (hf, heads) in names.items()}
    extra = files.get(HF_EXTRA_HEADS_FILE)
    if extra is not None:  # parallel heads 2..n, under our own names
        where.update({name: (extra, name, None) for name in extra.keys()})

    def read(name: str) -> torch.Tensor:
        handle, key, rope_heads = where[name]
        tensor = handle.get_tensor(key)
        return rope_rows_from_hf(tensor, rope_heads) if rope_heads else tensor

    shapes = {name: torch.Size(handle.get_slice(key).get_shape()) for name, (handle, key, _) in where.items()}
    return read, shapes, theirs, label


def _open_source(path: str):
    """The reader, parameter shapes, model config and error label of ``path``: an export, a
    checkpoint folder or a run directory."""
    folder = Path(path).expanduser()
    if (folder / PARAMS_FILE).is_file():
        return _read_export(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return _read_hf_export(folder)
    if (folder / ".metadata").is_file():  # one checkpoint: RUN_DIR/checkpoints/step_N
        problem = problem_of(folder)
        if problem is not None:
            raise CheckpointError(f"init.path={path}: the checkpoint is damaged ({problem}); give another "
                                  f"step's folder or the run directory (its newest intact checkpoint)")
        if (warning := unverified_warning(folder)) is not None:
            print(warning, file=sys.stderr)
        return _read_checkpoint(folder)
    if RunDir(folder).checkpoints_dir.is_dir():
        return _read_checkpoint(checkpoint_folder(folder))
    raise CheckpointError(f"init.path={path} is not a Meta-format folder ({PARAMS_FILE} + "
                          f"{WEIGHTS_FILE}, from `megatrain export --format meta`), nor a megatrain Hugging "
                          f"Face export (config.json + model.safetensors), nor a run directory "
                          f"(with checkpoints/), nor a checkpoint folder (RUN_DIR/checkpoints/step_N)")


def read_init_weights(path: str, cfg: ModelConfig, seed: int = 0) -> InitWeights:
    """The weights a fresh run of ``cfg`` starts from (``init.path``), checked against the source:
    shape keys first, then every name and shape the copy reads."""
    read, their_shapes, theirs, label = _open_source(path)
    check_compatible(cfg, theirs, label)
    expected_source = parameter_shapes(theirs)
    wrong = sorted(set(expected_source) ^ set(their_shapes)) or sorted(
        n for n in expected_source if their_shapes[n] != expected_source[n])
    if wrong:
        raise CheckpointError(f"{label}: its weights do not match its model config ({len(wrong)} "
                              f"parameters missing, extra or of another shape, e.g. {wrong[0]})")
    shapes = parameter_shapes(cfg)
    sources = source_names(LayerLayout.of(cfg), LayerLayout.of(theirs), shapes)
    misfit = [n for n, s in sources.items() if s is not None and their_shapes.get(s) != shapes[n]]
    if misfit:  # unreachable when check_compatible passed; a guard against a layout change
        raise CheckpointError(f"{label}: {misfit[0]} has another shape than ours")
    return InitWeights(sources, read, cfg, seed, shapes, _describe(path, cfg, theirs))
