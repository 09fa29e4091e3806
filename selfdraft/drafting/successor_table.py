"""The successor table a ``successor`` (or ``merged``) arm starts from: for each token id the target's top-k next
tokens (Token Recycling), seeded from the target's logits over text (the training prompts and their greedy
continuations) and stored in the bundle (``SUCCESSORS_FILE``: one tensor [V, k], -1 where a token was never seen, the
vocabulary size and k in the header).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..runtime.checkpoint import load_container, save_container
from ..runtime.layers import LayerStack

TABLE_FORMAT = "ctxdraft-successors"
TABLE_KEY = "successor_ids"


def empty_table(vocab_size: int, top_k: int) -> torch.Tensor:  # [V, k]
    return torch.full((vocab_size, top_k), -1, dtype=torch.long)


def record_successors(table: torch.Tensor, token_ids: list[int], topk_ids: torch.Tensor) -> None:
    """``topk_ids[t]`` [T, k'] are the target's best next tokens after ``token_ids[t]``: they become that token's row
    (later positions overwrite earlier ones, as in decoding)."""
    k = min(topk_ids.shape[1], table.shape[1])
    rows = torch.tensor(token_ids, dtype=torch.long)
    keep = rows < table.shape[0]
    table[rows[keep], :k] = topk_ids[keep, :k].to(table.dtype).cpu()


@torch.inference_mode()
def build_successor_table(stack: LayerStack, sequences: list[list[int]], top_k: int = 4, chunk: int = 512) -> torch.Tensor:
    """The table [V, top_k] from the target's logits at every position of ``sequences`` (token ids, e.g. each training
    prompt followed by its greedy continuation), one forward per ``chunk`` tokens."""
    top_k = checks.integer("successor top_k", top_k, minimum=1, maximum=64)
    table: torch.Tensor | None = None
    for seq in sequences:
        cache = stack.new_cache()
        for start in range(0, len(seq), chunk):
            ids = seq[start : start + chunk]
            hidden = stack.run(stack.embed(torch.tensor([ids])), 0, stack.num_layers, cache,
                               torch.arange(start, start + len(ids)))
            logits = stack.logits(hidden)[0]  # [T, V]
            if table is None:
                table = empty_table(logits.shape[-1], top_k)
            record_successors(table, ids, logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices)
    if table is None:
        raise CtxdraftError("a successor table needs at least one token of text")
    return table


def save_successor_table(path: Path, table: torch.Tensor) -> None:
    V, k = table.shape
    save_container(Path(path), {TABLE_KEY: table.to(torch.int32).contiguous()}, {"vocab_size": V, "top_k": k}, TABLE_FORMAT)


_REMEDY = "rebuild it for this target (or drop the arm's table setting)"


def read_successor_table(path: Path) -> torch.Tensor:
    """The stored table [V, k] as written (what can be checked without the target); a missing or damaged file, or
    one that is not a successor table, is one error naming the file."""
    tensors, header = load_container(Path(path), "successor table", _REMEDY)
    table = tensors.get(TABLE_KEY)
    if table is None or table.dim() != 2 or not isinstance(header, dict) or header.get("vocab_size") != table.shape[0] \
            or header.get("top_k") != table.shape[1]:
        raise CtxdraftError(f"successor table {display_path(path)} is not a successor table ({TABLE_KEY} [V, k] with "
                            f"vocab_size and top_k in its header); {_REMEDY}")
    return table


def load_successor_table(path: Path, vocab_size: int, top_k: int) -> torch.Tensor:
    """The stored table as [vocab_size, top_k] int64 (a wider table is cut, a narrower one padded with -1); a table
    for another vocabulary, or a damaged one, is one error naming the file."""
    remedy = _REMEDY
    table = read_successor_table(path)
    where = display_path(path)
    if table.shape[0] != vocab_size:
        raise CtxdraftError(f"successor table {where} is for a vocabulary of {table.shape[0]} tokens, this target has "
                            f"{vocab_size}; {remedy}")
    table = table.long()
    if table.numel() and (int(table.min()) < -1 or int(table.max()) >= vocab_size):
        raise CtxdraftError(f"successor table {where} holds token ids outside -1..{vocab_size - 1}; {remedy}")
    out = empty_table(vocab_size, top_k)
    k = min(top_k, table.shape[1])
    out[:, :k] = table[:, :k]
    return out
