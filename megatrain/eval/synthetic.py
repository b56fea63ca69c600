"""The synthetic probes on a ``megatrain data synth`` dataset's val split: induction and modular
polynomial arithmetic (the tasks and their token layouts: megatrain/data/synth/).

Both read head 1 (next-token prediction) teacher-forced: one forward per batch of documents, the
argmax at each scored position. For polynomial answers this *is* greedy decoding: all the answer's
coefficient tokens are the argmax given the true prefix exactly when greedy generation writes the true answer
(it follows the true prefix as long as it is right), so the exact-match rate is greedy accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatrain.data.shards import MANIFEST_NAME
from megatrain.data.synth import induction, polynomial
from megatrain.data.synth.dataset import EOS_ID, read_documents, synth_settings
from megatrain.errors import DataError


@torch.no_grad()
def head1_predictions(model, documents: list[np.ndarray], *, device, batch_size: int,
                      pad_id: int) -> list[np.ndarray]:
    """Head 1's argmax at every position of every document (entry p predicts token p+1).
    Documents are padded at the end: attention is causal, so padding never changes a prediction."""
    positions = model.rope_cos.shape[0]
    longest = max(len(d) for d in documents)
    if longest > positions:
        raise DataError(f"a document of {longest} tokens is longer than the model's {positions} positions "
                        f"(model.max_seq_len / data.seq_len of its training)")
    predictions = []
    for start in range(0, len(documents), batch_size):
        batch = documents[start:start + batch_size]
        width = max(len(d) for d in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, doc in enumerate(batch):
            tokens[row, :len(doc)] = torch.from_numpy(doc)
        argmax = model(tokens.to(device)).argmax(dim=-1).cpu().numpy()  # (B, T)
        predictions += [argmax[row, :len(doc)] for row, doc in enumerate(batch)]
    return predictions


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def evaluate_induction(model, cfg, dataset_dir: Path, *, device, batch_size: int) -> dict:
    """Head 1's accuracy on the second token of a name's later occurrences (the induction probe),
    beside its accuracy on first occurrences, where only chance (1 / N_SECOND) is possible."""
    dataset_dir = Path(dataset_dir)
    synth_settings(dataset_dir, "induction")
    documents = read_documents(dataset_dir, "val")
    predictions = head1_predictions(model, documents, device=device, batch_size=batch_size, pad_id=EOS_ID)
    counts = {"later": [0, 0], "first": [0, 0]}  # occurrence -> [correct, scored]
    for doc, pred in zip(documents, predictions):
        later, first = induction.scored_positions(doc)
        for kind, where in (("later", later), ("first", first)):
            where = np.asarray(where, dtype=np.int64)
            counts[kind][0] += int((pred[where] == doc[where + 1]).sum())
            counts[kind][1] += len(where)
    table = [{"occurrence": kind, "accuracy": _rate(*counts[kind]), "scored": counts[kind][1]}
             for kind in ("later", "first")]
    return {"task": "induction", "data": str(dataset_dir), "documents": len(documents),
            "accuracy": table[0]["accuracy"], "first_occurrence_accuracy": table[1]["accuracy"],
            "chance": 1 / induction.N_SECOND, "method": "teacher-forced head 1 argmax", "table": table}


# the result keys' prefix for answers in / out of the training distribution
DISTRIBUTION = {"in": "in_distribution", "out": "out_of_distribution"}


def evaluate_polynomial(model, cfg, dataset_dir: Path, *, device, batch_size: int) -> dict:
    """Exact-match accuracy of the answer by number of operations, in and out of the training
    distribution (greedy decoding's accuracy, see the module docstring), and per-coefficient
    accuracy."""
    dataset_dir = Path(dataset_dir)
    ring = polynomial.Settings.from_manifest(synth_settings(dataset_dir, "polynomial"),
                                             dataset_dir / MANIFEST_NAME)
    documents = read_documents(dataset_dir, "val")
    predictions = head1_predictions(model, documents, device=device, batch_size=batch_size, pad_id=EOS_ID)
    by_ops: dict[int, list[int]] = {}  # operations -> [exact, coefficients right, examples]
    for doc, pred in zip(documents, predictions):
        n_ops, equals = polynomial.answer_span(doc)
        answer = slice(equals, equals + ring.degree)  # positions that predict the answer
        right = pred[answer] == doc[equals + 1:equals + 1 + ring.degree]
        entry = by_ops.setdefault(n_ops, [0, 0, 0])
        entry[0] += int(right.all())
        entry[1] += int(right.sum())
        entry[2] += 1
    table = [{"operations": k, "distribution": "in" if ring.in_distribution(k) else "out",
              "exact_match": exact / n, "coefficient_accuracy": coeffs / (n * ring.degree),
              "examples": n}
             for k, (exact, coeffs, n) in sorted(by_ops.items())]

    def pooled(kind: str, key: str = "exact_match") -> float | None:
        rows = [r for r in table if r["distribution"] == kind]
        return _rate(sum(r[key] * r["examples"] for r in rows), sum(r["examples"] for r in rows))

    return {"task": "polynomial", "data": str(dataset_dir), "documents": len(documents),
            "ring": ring.ring, "train_operations": list(ring.train_ops),
            **{f"{DISTRIBUTION[kind]}_accuracy": pooled(kind) for kind in DISTRIBUTION},
            **{f"{DISTRIBUTION[kind]}_coefficient_accuracy": pooled(kind, "coefficient_accuracy")
               for kind in DISTRIBUTION},
            "method": "teacher-forced head 1 argmax exact match (= greedy decoding's)", "table": table}
