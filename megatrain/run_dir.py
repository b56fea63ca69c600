"""The run directory's config: written atomically, and checked before a run resumes in it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from megatrain.config import Config, to_yaml
from megatrain.errors import ConfigError
from megatrain.files import atomic_write_text


def has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file()


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume checkpoints of another model (before anything is written or queued).

    ``model.vocab_size: 0`` means "the dataset's", which the trainer fills in before it writes
    config.yaml, so 0 on either side matches any vocabulary size (the trainer compares again once
    it has resolved the value).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not has_checkpoints(run_dir):
        return
    old = OmegaConf.to_container(OmegaConf.load(saved).get("model", {}))
    new = OmegaConf.to_container(OmegaConf.structured(cfg).model)
    if 0 in (old.get("vocab_size"), new.get("vocab_size")):
        old.pop("vocab_size", None)
        new.pop("vocab_size", None)
    if old != new:
        differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"run.dir={run_dir} holds checkpoints of a different model "
                          f"(model.{', model.'.join(differing)} differ from {saved}); use a new "
                          f"run.dir or the same model settings to resume")


def write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
