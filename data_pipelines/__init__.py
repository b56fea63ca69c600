"""Data preparation pipelines (``megatrain data prepare``), built on datatrove.

Importing this package is cheap: datatrove and tokenizers load when a pipeline runs.
"""

from megatrain.data_pipelines.prepare import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    add_prepare_arguments,
    ensure_default_dataset,
    prepare_dataset,
    run_prepare,
)

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "add_prepare_arguments",
    "ensure_default_dataset",
    "prepare_dataset",
    "run_prepare",
]
