"""The paper-size configs have Llama-2's shapes: SwiGLU widths rounded to multiples of 256, so the
6.7B and 13B models match Llama-2 7B / 13B (and Meta's released 7B MTP models) layer for layer."""

from pathlib import Path

import pytest
import torch

from megatrain.config import load_config
from megatrain.model.mtp import MTPTransformer, count_parameters
from megatrain.model.transformer import ffn_hidden_dim

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))

# Llama-2's published shapes (params.json: multiple_of 256) and parameter counts (untied input and
# output embeddings, vocabulary 32000).
LLAMA2_FFN_WIDTH = {4096: 11008, 5120: 13824}
LLAMA2_PARAMETERS = {"6.7b": 6_738_415_616, "13b": 13_015_864_320}


def _model_cfg(path, *overrides):
    return load_config(path, list(overrides)).model


def test_paper_configs_are_found():
    """The parametrized checks below are not vacuous."""
    assert len(CONFIGS) >= 13, f"expected the 13 shipped configs under {PAPER}: {CONFIGS}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_round_ffn_width_as_llama2(path):
    assert _model_cfg(path).multiple_of == 256, f"{path.name}: set model.multiple_of: 256"


@pytest.mark.parametrize("name, dim", [("6.7b_n1", 4096), ("6.7b_n4", 4096),
                                       ("6.7b_bytes_n8", 4096), ("13b_n1", 5120), ("13b_n4", 5120)])
def test_ffn_width_matches_llama2(name, dim):
    cfg = _model_cfg(PAPER / f"{name}.yaml")
    assert cfg.dim == dim
    assert ffn_hidden_dim(cfg) == LLAMA2_FFN_WIDTH[dim], (name, ffn_hidden_dim(cfg))


def test_ffn_width_check_catches_the_old_rounding():
    """Negative control: the old rounding (multiple_of 64) gives 10944 at 6.7B, not 11008."""
    cfg = _model_cfg(PAPER / "6.7b_n4.yaml", "model.multiple_of=64")
    assert ffn_hidden_dim(cfg) == 10944 != LLAMA2_FFN_WIDTH[4096]


@pytest.mark.parametrize("size", list(LLAMA2_PARAMETERS))
@pytest.mark.parametrize("n_future", [1, 4])
def test_parameter_count_matches_llama2(size, n_future):
    """Parameter-matched MTP (L - n trunk layers + n head layers) has exactly Llama-2's count;
    built on the meta device, so nothing is allocated."""
    cfg = _model_cfg(PAPER / f"{size}_n{n_future}.yaml")
    with torch.device("meta"):
        model = MTPTransformer(cfg, max_seq_len=16)
    assert count_parameters(model) == LLAMA2_PARAMETERS[size], (size, n_future, count_parameters(model))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.endswith("_n1")], ids=lambda p: p.stem)
def test_paper_multi_token_configs_sum_the_heads_losses_unweighted(path):
    """The paper's loss is the plain sum over heads; the embedded default's small extra-head weight
    (a choice for 2M-parameter models) must not leak into the paper's sizes."""
    from megatrain.config import head_loss_weights

    cfg = load_config(path)
    assert head_loss_weights(cfg) == [1.0] * cfg.model.n_future, \
        f"{path.name}: set loss.extra_heads_weight: 1.0"


# Table S13's model-scaling rows (§3.1): every size at peak lr 3e-4 with batches of 8·2^20 tokens;
# 10,850 steps (91B tokens) and warmup 1000 up to 3B, 25,000 steps and warmup 2000 at 6.7B and 13B;
# all decay to 3% of the peak, Adam beta2 0.95, weight decay 0.1, clipping 1.0. The byte-level 7B
# model (§3.3) sees 314B bytes.
BATCH_TOKENS = 8 * 2**20
TABLE_S13 = {size: (10_850, 1000) for size in ("0.3b", "0.6b", "1.3b", "3b")} | \
            {size: (25_000, 2000) for size in ("6.7b", "13b")}
BYTE_MODEL_TOKENS = 314e9


def _schedule_problems(cfg, size: str, byte_level: bool) -> list[str]:
    t = cfg.train
    wanted = {"lr": 3e-4, "min_lr_ratio": 0.03, "beta2": 0.95, "weight_decay": 0.1, "grad_clip": 1.0}
    problems = [f"train.{k}={getattr(t, k)} (paper: {v})" for k, v in wanted.items() if getattr(t, k) != v]
    tokens = t.batch_size * cfg.data.seq_len
    if byte_level:
        if abs(tokens * t.steps - BYTE_MODEL_TOKENS) > 0.01 * BYTE_MODEL_TOKENS:
            problems.append(f"{tokens * t.steps / 1e9:.0f}B bytes in all (paper: 314B)")
        if t.warmup_steps != 2000:
            problems.append(f"train.warmup_steps={t.warmup_steps} (the 7B rows: 2000)")
        return problems
    steps, warmup = TABLE_S13[size]
    if tokens != BATCH_TOKENS:
        problems.append(f"batch of {tokens} tokens (paper: 8·2^20 = {BATCH_TOKENS})")
    if (t.steps, t.warmup_steps) != (steps, warmup):
        problems.append(f"train.steps={t.steps}, warmup_steps={t.warmup_steps} (paper: {steps}, {warmup})")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_train_with_table_s13s_schedule(path):
    size, byte_level = path.stem.split("_")[0], "bytes" in path.stem
    assert _schedule_problems(load_config(path), size, byte_level) == [], path.name


def test_schedule_check_catches_the_old_guesses():
    """Negative control: the values the configs had before (per-size lr guesses, 25k steps of
    128 sequences at 0.3B, 256 at 6.7B bytes) are each reported."""
    old_small = load_config(PAPER / "0.3b_n4.yaml", ["train.lr=6e-4", "train.steps=25000",
                                                     "train.batch_size=128", "train.warmup_steps=2000"])
    assert len(_schedule_problems(old_small, "0.3b", False)) == 3
    old_bytes = load_config(PAPER / "6.7b_bytes_n8.yaml", ["train.batch_size=256"])
    assert _schedule_problems(old_bytes, "6.7b", True) == ["52B bytes in all (paper: 314B)"]


def test_the_byte_model_has_one_unembedding_per_byte_head():
    """Replicated unembeddings: the full 32-layer trunk (Llama-2 7B's, without its 32000-token
    embeddings) and eight (320 x 4096) unembeddings, one per byte head."""
    cfg = _model_cfg(PAPER / "6.7b_bytes_n8.yaml", "model.vocab_size=320")  # 257 padded to 64
    with torch.device("meta"):
        model = MTPTransformer(cfg, max_seq_len=16)
    assert cfg.head_type == "replicated" and model.layout.n_trunk_layers == 32
    llama_blocks_and_norm = LLAMA2_PARAMETERS["6.7b"] - 2 * 32000 * 4096
    assert count_parameters(model) == llama_blocks_and_norm + 320 * 4096 * (1 + 8)
