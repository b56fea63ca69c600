"""A Llama with sequential MTP layers, as `megatrain export --format hf` writes it.

This file is copied into the export folder; ``config.json``'s ``auto_map`` names it, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the main model as
a plain ``LlamaForCausalLM``. transformers' own ``generate(..., use_mtp=True)`` then reads the
MTP layers from the same ``model.safetensors`` (keys ``model.layers.{N+k}.*``, N =
``num_hidden_layers``, k < ``num_mtp_layers``) through the patterns below: it finds MTP weights
by the model's ``_keys_to_ignore_on_load_unexpected`` (a set; a list breaks its bookkeeping).
"""

from transformers import LlamaForCausalLM


class MtpLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        n, k = config.num_hidden_layers, getattr(config, "num_mtp_layers", None) or 0
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {
            rf"model\.layers\.{n + i}\..*" for i in range(k)}
