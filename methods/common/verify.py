"""Verification rules for draft tokens against one target pass.

`target_logits` has one row per draft token plus one: row i scores the token
at draft position i, the last row gives the bonus token.
"""
from __future__ import annotations

import torch

from methods.base import Sampling
from methods.common import vocab
from methods.common.sampling import sample, warp


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)) along the last dim: what a rejection leaves to sample from; p itself where
    nothing is left (p <= q everywhere up to rounding). The one residual every rule uses."""
    rest = (p - q).clamp_min_(0)
    total = rest.sum(-1, keepdim=True)
    if rest.dim() == 1:  # one distribution: its callers read scalars from it next anyway
        return rest.div_(total) if float(total) > 0 else p
    return torch.where(total > 0, rest.div_(total.clamp_min(torch.finfo(rest.dtype).tiny)), p)


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of `draft` equal to the target's argmax; returns (accepted, next token)."""
    choices = target_logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def verify_speculative(
    draft: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al.; Chen et al.): accept draft i with min(1, p/q);
    at the first rejection sample from normalise(max(0, p - q)); if all pass, sample the bonus from p.

    `draft_probs` is (k x V), the distributions the draft tokens were sampled from (one-hot for a
    deterministic drafter); `target_probs` is (k+1 x V). The result is distributed exactly as p.
    """
    for i, tok in enumerate(draft):
        p, q = float(target_probs[i, tok]), float(draft_probs[i, tok])
        u = float(torch.rand((), generator=generator))
        if q > 0 and u * q < p:  # u < p/q without dividing
            continue
        return i, sample(residual(target_probs[i], draft_probs[i]), generator)
    return len(draft), sample(target_probs[len(draft)], generator)


def verify(
    draft: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Greedy or stochastic verification, whichever `sampling` asks for."""
    if sampling.greedy:
        return verify_greedy(draft, target_logits)
    if draft_probs is None:  # deterministic drafter: q is one-hot on each draft token
        draft_probs = torch.zeros(len(draft), target_logits.shape[-1])
        draft_probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)] = 1.0
    return verify_speculative(draft, draft_probs.cpu(), warp(target_logits, sampling).cpu(), generator)


def _normalise(dist: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = dist.sum()
    return dist / total if total > 0 else fallback


def verify_siblings(
    tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    replacement: bool,
    generator: torch.Generator,
) -> tuple[int | None, int]:
    """Recursive rejection sampling over one node's drafted children, in draw order (SpecInfer,
    arXiv 2305.09781, Alg. 2; RSD, arXiv 2402.15678, Alg. 1). Returns (index in `tokens` of the
    accepted child or None, the token emitted); the token is distributed exactly as `target_probs`.

    Child i is accepted with min(1, p_i(x_i) / q_i(x_i)), where q_i is x_i's distribution given the
    earlier draws; after a rejection p_{i+1} = normalise(max(0, p_i - q_i)). q_i is:
    - `draft_probs` itself for i.i.d. draws (`replacement=True`, SpecInfer);
    - `draft_probs` with x_1..x_{i-1} removed and renormalised for draws without replacement
      (Gumbel-Top-k or stochastic beam search, RSD);
    - a point mass on x_i when `draft_probs` is None (a deterministic drafter): then p_{i+1} is
      p_i with x_i removed.
    If every child is rejected, the token is sampled from the final residual. The distributions stay
    where `target_probs` lives; only the two probabilities of each tried child reach the host.
    """
    p = target_probs.float()
    q = None if draft_probs is None else draft_probs.float().to(p.device)
    if q is not None and not replacement and len(tokens) > 1:
        q = q.clone()  # renormalised in place as drawn children are removed
    for i, tok in enumerate(tokens):
        u = float(torch.rand((), generator=generator))
        if q is None:
            if u < float(p[tok]):
                return i, tok
            removed = p.clone()
            removed[tok] = 0.0
            p = _normalise(removed, p)
            continue
        p_x, q_x = torch.stack((p[tok], q[tok])).tolist()
        if q_x > 0 and u * q_x < p_x:  # u < p/q without dividing
            return i, tok
        p = residual(p, q)
        if not replacement and i + 1 < len(tokens):
            q[tok] = 0.0
            left = q.sum()
            if left > 0:
                q.div_(left)
    return None, int(vocab.sample(p[None], 1, generator)[0, 0])


def verify_tree_greedy(tree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest root-to-node path whose tokens equal the target's argmax; returns (path, next token).
    `logits[0]` scores the root's children, `logits[1 + i]` node i's. On an accelerator: one batched
    argmax, one transfer; on the CPU, where each row costs a pass over the vocabulary, only the rows
    along the walk are read."""
    if logits.device.type == "cpu":
        def choice(r: int) -> int:
            return int(vocab.argmax(logits[r]))
    else:
        choice = vocab.argmax(logits).tolist().__getitem__
    path, node = [], -1
    while True:
        token = choice(node + 1)
        child = tree.children[node].get(token)
        if child is None:
            return path, token
        path.append(child)
        node = child


def verify_tree_stochastic(tree, target_probs, generator: torch.Generator) -> tuple[list[int], int]:
    """Walk down from the root, at each node verifying its children by `verify_siblings`.
    `target_probs`: the target's distributions, row 0 the root's and row 1 + i node i's, as a tensor or
    as a function of the row (so only the rows on the walk are computed)."""
    probs_of = target_probs if callable(target_probs) else target_probs.__getitem__
    path, node = [], -1
    while True:
        draws = tree.draws[node]
        p = probs_of(node + 1)
        if not draws:
            return path, int(vocab.sample(p.float()[None], 1, generator)[0, 0])
        index, token = verify_siblings(
            [tree.tokens[c] for c in draws], tree.dists.get(node), p, tree.replacement, generator
        )
        if index is None:
            return path, token
        node = draws[index]
        path.append(node)


def verify_tree(tree, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[list[int], int]:
    """Greedy or stochastic tree verification, whichever `sampling` asks for (sampling warps only the
    rows the walk visits)."""
    if sampling.greedy:
        return verify_tree_greedy(tree, logits)
    return verify_tree_stochastic(tree, lambda r: warp(logits[r], sampling), generator)
