"""The model ``megatrain generate`` and ``megatrain eval`` read: a run directory's checkpoint or a
Meta-format export, with its tokenizer.

A checkpoint is verified once, here (its checksums cover every file, which for a large model is
worth not repeating); its step names eval's results file. If a training writing the run dir prunes
it before it is loaded, the newest checkpoint at that time is loaded instead (``read_checkpoint``)
and names the results. The tokenizer is the run dataset's, or the ``tokenizer.json`` an export
carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.config import Config
from megatrain.errors import ConfigError, UserError
from megatrain.model.mtp import MTPTransformer
from megatrain.run_dir import RunDir


@dataclass
class ModelSource:
    run_dir: Path | None
    export_dir: Path | None
    folder: Path | None  # the verified checkpoint folder of a run directory
    label: str  # the checkpoint's step, or "export": names the results file
    step: int | None = None  # the step asked for (None: the newest intact checkpoint)
    run_config: Config | None = None  # the checkpoint's config, read with it

    @classmethod
    def open(cls, run_dir: str | None, export_dir: str | None, step: int | None) -> ModelSource:
        from megatrain.inference.load import config_of, read_checkpoint

        if bool(run_dir) == bool(export_dir):
            raise ConfigError("give the model to evaluate with --run-dir DIR (a training run) or "
                              "--from EXPORT_DIR (a `megatrain export --format meta` folder), not both")
        if export_dir:
            if step is not None:
                raise ConfigError("--checkpoint picks a step of a --run-dir; an export folder holds "
                                  "one model")
            if not Path(export_dir).is_dir():
                raise ConfigError(f"--from {export_dir} is not a folder")
            return cls(None, Path(export_dir), None, "export")
        folder, cfg = read_checkpoint(run_dir, step, config_of)
        return cls(Path(run_dir), None, folder, str(RunDir.step_of(folder)), step, cfg)

    @property
    def results_dir(self) -> Path:
        """Where eval writes: the run dir's eval/ folder (an export's own eval/ folder)."""
        return RunDir(self.run_dir or self.export_dir).eval_dir

    def describe(self) -> dict:
        if self.export_dir is not None:
            return {"export": str(self.export_dir)}
        return {"run_dir": str(self.run_dir), "checkpoint": int(self.label)}

    def config(self) -> Config | None:
        """The run's config (None for an export: its Config comes with its weights, ``load``)."""
        return self.run_config

    def trained_length(self) -> int | None:
        from megatrain.spec import trained_length

        cfg = self.config()
        return trained_length(cfg) if cfg is not None else None

    def load(self, device: torch.device, dtype: torch.dtype = torch.float32,
             max_seq_len: int | None = None) -> tuple[MTPTransformer, Config]:
        """The model in eval mode, with RoPE tables for ``max_seq_len`` positions (default: the
        training length; an export's: its default context), and its Config."""
        from megatrain.inference.load import load_checkpoint, load_exported, read_checkpoint

        if self.folder is None:
            return load_exported(self.export_dir, device=device, dtype=dtype, max_seq_len=max_seq_len)
        self.folder, loaded = read_checkpoint(self.run_dir, self.step, lambda folder: load_checkpoint(
            folder, device=device, dtype=dtype, max_seq_len=max_seq_len), folder=self.folder)
        self.label, self.run_config = str(RunDir.step_of(self.folder)), loaded[1]
        return loaded

    def tokenizer(self):
        """The tokenizer (``tokenizers.Tokenizer``) and EOS id the model was trained with."""
        from tokenizers import Tokenizer

        from megatrain.data_pipelines.vocab import EOS_TOKEN
        from megatrain.inference.export import TOKENIZER_FILE, dataset_tokenizer

        if self.export_dir is not None:
            path = self.export_dir / TOKENIZER_FILE
            if not path.is_file():
                raise UserError(f"{self.export_dir} has no {TOKENIZER_FILE}: export it from a run whose "
                                f"dataset is on this machine, or copy the tokenizer there")
            tokenizer = Tokenizer.from_file(str(path))
            return tokenizer, tokenizer.token_to_id(EOS_TOKEN)
        found = dataset_tokenizer(self.config())
        if found is None:
            raise UserError(f"the dataset of {self.run_dir} (data.path="
                            f"{self.config().data.path or 'the default'}) is not on this machine, so "
                            f"there is no tokenizer; export the run with its tokenizer and use --from")
        return Tokenizer.from_file(str(found[0])), found[1]


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
