"""Row-wise argmax, top-k and sampling over a large vocabulary, with few host transfers.

On a CPU, torch's argmax and topk walk a 151,936-entry row one element at a time (~0.3-0.6 ms a row),
while its max and sum reductions are vectorised and ~20x faster. So rows are cut into blocks of 128: the
block maxima (one vectorised pass) say which blocks can hold the answer, and only those are searched. The
results equal torch's (argmax: the first maximal index; top-k: the same values). Other devices use
torch's own kernels.

Sampling draws its uniforms from the CPU generator (so a seed gives the same draws on every device)
and searches the cumulative distribution where the rows live: per-block sums, then one block's entries,
accumulated in float64 (a float32 running sum over 151,936 entries would shift a small token's interval
by up to its whole width; per-block float32 sums of 128 entries are exact to ~1e-7 relative).
"""
from __future__ import annotations

import torch

BLOCK = 128


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """rows x V -> rows x blocks x BLOCK (the last block padded with `fill`)."""
    rest = x.shape[-1] % BLOCK
    if rest:
        x = torch.nn.functional.pad(x, (0, BLOCK - rest), value=fill)
    return x.reshape(x.shape[0], -1, BLOCK)


def _blocked(x: torch.Tensor) -> bool:
    return x.is_cpu and x.shape[-1] >= 32 * BLOCK


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` (the first maximal index of each row), for 1-D or 2-D `x`."""
    if not _blocked(x):
        return x.argmax(-1)
    blocks = _blocks(_rows(x), float("-inf"))
    best = blocks.amax(-1).argmax(-1)  # the first block holding the row's maximum
    inner = blocks[torch.arange(len(blocks)), best].argmax(-1)
    return (best * BLOCK + inner).reshape(x.shape[:-1])


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row, largest first, like `torch.topk(x, k)`.

    The k blocks with the largest maxima hold the k largest values: a value outside them is below k
    block maxima, so below k other values."""
    k = min(k, x.shape[-1])
    if not _blocked(x) or k > x.shape[-1] // BLOCK:
        return torch.topk(x, k, dim=-1)
    if k == 1:
        indices = argmax(x)[..., None]
        return x.gather(-1, indices), indices
    blocks = _blocks(_rows(x), float("-inf"))
    chosen = blocks.amax(-1).topk(k, dim=-1).indices  # rows x k
    candidates = blocks.gather(1, chosen[..., None].expand(-1, -1, BLOCK)).reshape(len(blocks), k * BLOCK)
    values, pos = candidates.topk(k, dim=-1)
    indices = chosen.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK
    return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)


def log_probs_at(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `tokens` (same leading dims), float32 (the fused log-softmax kernel is the
    fastest way to the normaliser on a CPU)."""
    return logits.float().log_softmax(-1).gather(-1, tokens)


def sample(probs: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` i.i.d. draws from each row of `probs` (rows x V, unnormalised allowed, non-negative):
    rows x count token ids on the rows' device. Inverse CDF: pick a block by its mass, then a token in it."""
    rows = _rows(probs.float())
    n, device = len(rows), rows.device
    blocks = _blocks(rows, 0.0)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # rows x blocks
    total = block_cdf[:, -1:]
    u = torch.rand(n, count, dtype=torch.float64, generator=generator).to(device)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(block_cdf, x, right=True).clamp_max(blocks.shape[1] - 1)  # first cdf > x
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), torch.zeros_like(x))
    inner = blocks[torch.arange(n, device=device)[:, None], block].double().cumsum(-1)  # rows x count x BLOCK
    within = torch.minimum(x - before, torch.nextafter(inner[..., -1], torch.zeros_like(x)))
    token = torch.searchsorted(inner, within[..., None], right=True).squeeze(-1).clamp_max(BLOCK - 1)
    return block * BLOCK + token


def sample_distinct(probs: torch.Tensor, k: int, generator: torch.Generator, drawn: list | None = None) -> list:
    """Up to k tokens drawn without replacement from each row of `probs`, in draw order (the
    Plackett-Luce order that Gumbel-Top-k gives), continuing after the tokens in `drawn` (returned with
    them); fewer when fewer tokens have mass. 1-D `probs`: a list; rows x V: a list per row.

    The first appearances in a stream of i.i.d. draws are exactly such draws (a draw of a token already
    seen is a rejection): one batched round of draws serves every row. A row that still lacks tokens
    goes on alone, and once its seen tokens hold most of the mass, draws the next ones from the rest
    directly (exact as well: that is the distribution of the stream's next new token)."""
    if probs.dim() == 1:
        return sample_distinct(probs[None], k, generator, None if drawn is None else [drawn])[0]
    probs = probs.float()
    totals = probs.sum(-1).tolist()
    seen = [list(d) for d in drawn] if drawn is not None else [[] for _ in totals]
    if drawn is None:
        for row, tokens in zip(seen, sample(probs, 4 * k + 4, generator).tolist()):
            _first_appearances(row, tokens, k)
    for r, total in enumerate(totals):
        if not total > 0:  # no mass (or NaN: a row of -inf log-probabilities): its draws mean nothing
            seen[r] = [] if drawn is None else seen[r]
        elif len(seen[r]) < k:
            _complete(probs[r], total, seen[r], k, generator)
    return seen


def _first_appearances(seen: list[int], tokens: list[int], k: int) -> None:
    got = set(seen)
    for tok in tokens:
        if len(seen) >= k:
            return
        if tok not in got:
            got.add(tok)
            seen.append(tok)


def _complete(probs: torch.Tensor, total: float, seen: list[int], k: int, generator: torch.Generator) -> None:
    """Extend `seen` to k tokens drawn without replacement from the 1-D `probs` (or until no mass is left)."""
    direct = False
    while len(seen) < k:
        if not direct and float(probs[seen].sum()) / total < 0.5:  # i.i.d. draws find new tokens often
            _first_appearances(seen, sample(probs[None], 4 * (k - len(seen)) + 4, generator)[0].tolist(), k)
            continue
        direct = True  # the seen tokens hold most of the mass: draw from the rest
        rest = probs.clone()
        rest[seen] = 0.0
        if not float(rest.sum()) > 0:
            return
        seen.append(int(sample(rest[None], 1, generator)[0, 0]))
