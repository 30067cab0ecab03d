"""What one micro-batch is: which rows form it, how they are collated, and the loss taken over it.

The order is a pure function of (seed, position), so a resumed run sees exactly the batches an
uninterrupted one would. Collation and loss are one contract: `collate` left-pads so that every
completion ends at the last position and records in `keep` how many last positions the loss needs;
`token_loss` asks the model for the logits of those positions only.
"""
from __future__ import annotations

import torch

from qlora_ops.tasks.core.config import Params

# ---------------------------------------------------------------- order
BUCKET_WINDOW = 16  # batches per window that is sorted by length (wide enough to group, narrow enough to mix)


def epoch_order(n_rows: int, epoch: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1) -> list[int]:
    """One epoch's row order. With `lengths`, length-bucketed: shuffle, sort each window of
    BUCKET_WINDOW batches by length, cut it into batches and shuffle the batches, so a batch holds
    rows of similar length (less padding) while the epoch stays a seeded shuffle."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    if not lengths:
        return perm
    w = BUCKET_WINDOW * batch_size
    ordered = [i for a in range(0, n_rows, w) for i in sorted(perm[a:a + w], key=lambda i: -lengths[i])]
    # Micro-batches run on across epochs: cut where this epoch's batches really start and end, and
    # shuffle only the whole batches, so the head and tail (shared with the epochs around) stay put.
    head = (-epoch * n_rows) % batch_size
    cuts = list(range(head, n_rows - batch_size + 1, batch_size))
    batches = [ordered[a:a + batch_size] for a in cuts]
    tail = ordered[cuts[-1] + batch_size:] if cuts else ordered[head:]
    return ordered[:head] + [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]] + tail


def batch_order(n_rows: int, micro: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """Row indices of micro-batch number `micro`: a pure function of (seed, position[, lengths]), so a
    resumed run sees exactly the batches an uninterrupted run would."""
    start = micro * batch_size
    out, orders = [], {}
    for k in range(start, start + batch_size):
        epoch, off = divmod(k, n_rows)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_rows, epoch, seed, lengths, batch_size)
        out.append(orders[epoch][off])
    return out


# ---------------------------------------------------------------- collation
def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Left-pad, so every completion ends at the last position: the loss then needs logits for
    the last K positions only (the LM head over the whole sequence is ~20% of a step)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, T - len(x):] = torch.tensor(x)
        labels[i, T - len(y):] = torch.tensor(y)
        mask[i, T - len(x):] = 1
    first = (labels != -100).float().argmax(dim=1)  # first completion position per row
    keep = int(T - first.min().item()) + 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "keep": min(keep, T)}


def collate_packed(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> dict:
    """Pack examples first-fit into rows of <= max_len tokens. Position ids restart at 0 for each
    example and no 2D mask is passed, so transformers builds a block-diagonal causal mask from the
    position ids: no token attends across an example boundary."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    for ex in sorted(examples, key=lambda e: -len(e[0])):
        row = next((r for r in rows if sum(len(x) for x, _ in r) + len(ex[0]) <= max_len), None)
        if row is None:
            rows.append(row := [])
        row.append(ex)
    T = max(sum(len(x) for x, _ in r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for x, y in r:
            ids[i, at:at + len(x)] = torch.tensor(x)
            labels[i, at:at + len(y)] = torch.tensor(y)
            pos[i, at:at + len(x)] = torch.arange(len(x))
            at += len(x)
        pos[i, at:] = torch.arange(T - at)  # padding is one more "sequence", never in the loss
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None, "keep": T}


def make_batch(examples: list, pad_id: int, params: Params) -> dict:
    """One micro-batch as training.packing says: packed rows, or one left-padded row per example."""
    if params.training.packing:
        return collate_packed(examples, pad_id, params.model.max_seq_len)
    return collate(examples, pad_id)


# ---------------------------------------------------------------- loss
def _targets(labels: torch.Tensor, K: int) -> torch.Tensor:
    """The labels the last K positions' logits predict (the loss's targets)."""
    return labels[:, -K + 1:] if K > 1 else labels[:, :0]


def completion_tokens(batch: dict) -> int:
    """Number of tokens the loss of `batch` is taken over, known before the forward pass."""
    return int((_targets(batch["labels"], batch["keep"]) != -100).sum())


def token_loss(model, batch: dict, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(sum of the completion tokens' cross-entropy, their number)."""
    ids, labels, K = batch["input_ids"].to(dev), batch["labels"].to(dev), batch["keep"]
    if batch["attention_mask"] is None:  # packed
        mask, pos = None, batch["position_ids"].to(dev)
    else:
        mask = batch["attention_mask"].to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions as generate() computes them for left padding
    # use_cache=False: no KV cache in training (and with a cache, packed-sequence masking is skipped)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=K, use_cache=False).logits
    tgt = _targets(labels, K)
    n = int((tgt != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, n


def batch_loss(model, batch: dict, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the batch's completion tokens, their number)."""
    loss, n = token_loss(model, batch, dev)
    return loss / max(n, 1), n
