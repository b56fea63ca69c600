"""Sequential MTP modules in Hugging Face's and DeepSeek-V3's key layouts (``megatrain export``).

The main model is a plain Llama of the ``n_layers`` trunk (``model.layers.0 .. N-1``), and depth
k's module follows at ``model.layers.{N + k - 1}.``, the layout of DeepSeek-V3's released
checkpoints, which transformers' ``generate(..., use_mtp=True)`` (``MtpModel``), vLLM's ``mtp``
speculative method and SGLang's NextN loader read:

    enorm.weight, hnorm.weight          megatrain mtp.{k-1}.enorm / .hnorm
    eh_proj.weight (dim, 2*dim)         megatrain mtp.{k-1}.eh_proj (columns: embedding half first,
                                        unless mtp_hidden_states_first; then hidden half first)
    shared_head.norm.weight             megatrain mtp.{k-1}.norm (transformers: post_norm)
    self_attn.*, mlp.*, input_layernorm, post_attention_layernorm   the module's block
    (deepseek-mtp only) embed_tokens.weight, shared_head.head.weight   copies of the shared
                                        embedding and unembedding, as DeepSeek's release holds them

What each engine must do to draft what megatrain drafted (docs/design.md): feed depth 1 the main
model's last hidden state *after* its final norm, and each later depth the previous depth's output
after its ``shared_head.norm``: transformers' default (``tie_last_hidden_states``), Megatron-Core,
SGLang and vLLM after its PR #45895.
"""

from __future__ import annotations

import torch

from megatrain.config import ModelConfig
from megatrain.model.layout import LayerLayout

MTP_MODULE_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
REMOTE_CODE = "modeling_mtp_llama.py"  # shipped in megatrain/inference/hf_remote/
REMOTE_CLASS = "MtpLlamaForCausalLM"


def mtp_layer_prefix(cfg: ModelConfig, j: int) -> str:
    """HF prefix of megatrain's ``mtp.{j}`` (depth j + 1): the layer after the trunk's last."""
    return f"model.layers.{LayerLayout.of(cfg).n_trunk_layers + j}."


def deepseek_copies(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Each MTP layer's copies of the shared embedding and unembedding, as DeepSeek-V3's release
    holds them (``--format deepseek-mtp``)."""
    out = {}
    for j in range(LayerLayout.of(cfg).n_depths):
        prefix = mtp_layer_prefix(cfg, j)
        # copies, not views: safetensors refuses tensors that share memory
        out[prefix + "embed_tokens.weight"] = state["tok_embeddings.weight"].clone()
        out[prefix + "shared_head.head.weight"] = state["output.weight"].clone()
    return out


def mtp_config_fields(cfg: ModelConfig) -> dict:
    """config.json keys transformers' MTP generation reads (and DeepSeek's key for the count)."""
    depths = LayerLayout.of(cfg).n_depths
    return {"num_mtp_layers": depths, "num_nextn_predict_layers": depths,
            "mtp_hidden_states_first": cfg.mtp_concat == "hidden_first",
            "tie_last_hidden_states": True,  # depth 1 reads the hidden state after the final norm
            "architectures": [REMOTE_CLASS],
            "auto_map": {"AutoModelForCausalLM": f"{REMOTE_CODE.removesuffix('.py')}.{REMOTE_CLASS}"}}
