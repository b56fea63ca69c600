"""Drafting with sequential MTP modules (model.mtp_kind=sequential) during self-speculative decoding.

After a forward that leaves the last token in the cache at position P (and head 1's pick t0 =
x_{P+1}), depth 1 drafts x_{P+2} from (hbar^0_P, Emb(t0)), depth 2 drafts x_{P+3} from (hbar^1_P,
Emb(d1)), and so on (module formula: model/mtp_module.py). Each depth's block attends to its own
earlier positions, so its KV cache must hold them; depth k's entry at position q is final once
x_{q+k} is known (q + k <= P + 1), provisional while it rests on a draft. So each drafting round
runs depth k over the positions from its ``frontier`` (the last final one) + 1 to P in one batched
forward, which makes the final entries, overwrites the provisional ones of the previous round (a
cache rolls back by forgetting; rejected drafts leave nothing behind) and gives the draft at P.
After plain forwards (no drafting) the frontiers lag behind and the same round catches them up.

Kept per row: the depths' inputs, hbar^{k-1} at every position (``hidden``), and the token ids
(``tokens``: the emitted ones, t0, then this round's drafts). This is what transformers'
``MTPCandidateGenerator`` computes too, which is why an export drafts there what it drafted here.
"""

from __future__ import annotations

import torch

from megatrain.model.kv_cache import ModelCache


class SequentialDrafter:
    def __init__(self, model, batch: int, capacity: int, cache: ModelCache):
        self.model, self.cache = model, cache
        self.depths = model.layout.n_depths
        param = next(model.parameters())
        self.rows = torch.arange(batch, device=param.device)
        self.hidden = torch.zeros(self.depths, batch, capacity, model.cfg.dim, device=param.device,
                                  dtype=param.dtype)  # hbar^0 .. hbar^{D-1}
        self.tokens = torch.zeros(batch, capacity + self.depths + 1, dtype=torch.long, device=param.device)
        self.frontier = [torch.full((batch,), -1, dtype=torch.long) for _ in range(self.depths)]

    def record(self, positions: torch.Tensor, tokens: torch.Tensor, trunk_out: torch.Tensor) -> None:
        """A main forward: the tokens (B, W) at ``positions`` (B, W) and the trunk's outputs there
        (B, W, dim, before the final norm)."""
        positions = positions.to(self.rows.device)
        self.tokens[self.rows[:, None], positions] = tokens.to(self.rows.device)
        self.hidden[0][self.rows[:, None], positions] = self.model.norm(trunk_out).to(self.hidden.dtype)

    def draft(self, last: torch.Tensor, t0: torch.Tensor, pick) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts (B, D) for x_{P+2} .. x_{P+D+1} of each row (``last`` = P, ``t0`` = x_{P+1}), and
        the distributions they were drawn from (None when greedy). ``pick(logits (B, V)) ->
        (tokens (B,), probs (B, V) or None)``."""
        device = self.rows.device
        last = last.to(device)
        self.tokens[self.rows, last + 1] = t0.to(device)
        drafts, probs = [], []
        for k in range(1, self.depths + 1):
            start = torch.minimum(self.frontier[k - 1].to(device) + 1, last)  # P itself always: its draft
            width = int((last - start).max()) + 1
            # each row's positions start..P, padded by repeating P (the same values written twice)
            positions = torch.minimum(start[:, None] + torch.arange(width, device=device), last[:, None])
            hidden_in = self.hidden[k - 1][self.rows[:, None], positions]  # hbar^{k-1}
            embedded = self.model.tok_embeddings(self.tokens[self.rows[:, None], positions + k])  # x_{q+k}
            self.cache.at(positions)
            out = self.model.head_forward(k, hidden_in, self.cache, embedded=embedded)
            hbar = self.model.chain_value(k, out)  # hbar^k: what depth k+1 reads
            if k < self.depths:
                self.hidden[k][self.rows[:, None], positions] = hbar.to(self.hidden.dtype)
            token, prob = pick(self.model.output(hbar[:, -1]))  # at P: x_{P+k+1}
            self.tokens[self.rows, last + k + 1] = token.to(device)
            drafts.append(token)
            probs.append(prob)
            # final through q + k <= P + 1; beyond, the entries rest on this round's drafts
            self.frontier[k - 1] = (last - k + 1).cpu()
        stacked = torch.stack(probs, dim=1) if probs[0] is not None else None
        return torch.stack(drafts, dim=1), stacked
