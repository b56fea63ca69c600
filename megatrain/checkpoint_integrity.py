"""Checksums of a checkpoint's files: written with it, checked before it is trusted.

A checkpoint folder holds ``checksums.json``::

    {"format": "megatrain-checksums-v1", "files": {"__0_0.distcp": {"bytes": 123, "sha256": "..."},
                                                  ".metadata": {...}, ...}}

DCP itself notices a truncated file only sometimes, and bytes overwritten inside tensor data not at
all (they load silently, and training continues from slightly different weights), so every file
is hashed. A checkpoint is intact only if every entry of its folder is listed in the manifest and
matches it: a file added later, or one whose entry was removed, makes it damaged like a changed
one. A folder without a manifest (saved by a megatrain older than checksums, or the manifest was
deleted) cannot be verified at all: it is usable, but whoever loads it says so by name
(``unverified_warning``). The work is spread over the ranks (rank r hashes files r, r + world,
...), and ``problem_of`` gives every rank the same verdict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatrain.parallel.comm import all_reduce_host

CHECKSUMS = "checksums.json"
FORMAT = "megatrain-checksums-v1"
_CHUNK = 8 << 20


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(folder: Path) -> list[str]:
    """The checkpoint's own files, in a fixed order (the manifest and config copy excluded)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def checksums_text(folder: Path) -> str:
    """The manifest of every file of ``folder`` (a complete checkpoint not yet published), as the
    text of its ``checksums.json``; the caller writes it (on rank 0).

    Collective: every rank calls it and hashes its share of the files.
    """
    rank, world = _world()
    names = _files(folder)
    mine = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)}
            for n in names[rank::world]}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    return json.dumps({"format": FORMAT, "files": mine}, indent=1)


def problem_of(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder`` (None: usable), the same on every rank.

    Without a manifest (``unverified_warning``) a checkpoint is usable if DCP's metadata is there;
    its tensors are then only as trustworthy as the file system.
    """
    rank, world = _world()
    manifest_path = folder / CHECKSUMS
    problem = None
    if not folder.is_dir():
        problem = ("it is a file, not a checkpoint folder" if folder.exists() else
                   "it no longer exists (a training writing this run dir may have pruned it)")
    elif not (folder / ".metadata").is_file():
        problem = "its .metadata file is missing"
    elif manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            if manifest.get("format") != FORMAT or not isinstance(files, dict):
                raise ValueError(manifest.get("format"))
            # any failure here is this checkpoint's problem, never an exception that would leave
            # this rank out of the verdict's all-reduce below while the others wait in it
            problem = (_unlisted(folder, files)
                       or _check_files(folder, sorted(files)[rank::world], files))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            problem = f"its {CHECKSUMS} is unreadable"
        except OSError as err:
            problem = f"reading it failed ({err.strerror or err})"
    # every rank checked a share: the checkpoint is intact only if every share is
    flags = torch.tensor([0 if problem is None else 1])
    all_reduce_host(flags, dist.group.WORLD if world > 1 else None, op=dist.ReduceOp.MAX)
    if flags.item() and problem is None:
        problem = "another rank found a damaged file (see its output)"
    return problem


def unverified_warning(folder: Path) -> str | None:
    """The warning to print when the usable checkpoint ``folder`` is loaded without a manifest;
    None when it has one (it was verified)."""
    if (folder / CHECKSUMS).is_file():
        return None
    return (f"warning: checkpoint {folder} has no {CHECKSUMS} (saved by a megatrain older than "
            f"checksums, or the file was removed): its files cannot be verified and are loaded as they "
            f"are; checkpoints saved from now on have checksums")


def _unlisted(folder: Path, listed: dict) -> str | None:
    """An entry of the folder the manifest does not list (added later, or its entry removed)."""
    extra = sorted(p.name for p in folder.iterdir() if p.name != CHECKSUMS and p.name not in listed)
    if extra:
        return (f"{extra[0]} is not listed in its {CHECKSUMS} (added after the checkpoint was written, "
                f"or its entry was removed), so it cannot be verified")
    return None


def _check_files(folder: Path, names: list[str], expected: dict) -> str | None:
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"file {name} is missing"
        size = path.stat().st_size
        if size != expected[name]["bytes"]:
            return f"file {name} has {size} bytes, {expected[name]['bytes']} were written"
        if _sha256(path) != expected[name]["sha256"]:
            return f"file {name} does not match its checksum (the data was changed after writing)"
    return None
