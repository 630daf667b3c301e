"""Token trees drafted in one step and verified by the target in one forward pass.

API (shared by every tree, graph and beam method):

- `DraftTree(replacement=False)`: nodes 0..n-1 with `tokens[i]`, `parents[i]` (-1 = a child of the
  root, which is the last accepted token and is not a node) and `depths[i]` (1 for the root's
  children). `add(parent, token)` appends a node (parents always come before children) and merges
  a repeated sibling token into the existing node, so a set of drafted sequences becomes a trie.
  `set_dist(parent, q)` records the draft distribution `parent`'s children were drawn from (a 1-D
  tensor on any device); a parent without one is deterministic (point-mass drafts, e.g. Token
  Recycling, n-gram or beam tries). `draws[parent]` keeps the children in the order they were drawn
  (repeats allowed when `replacement=True`: i.i.d. draws); the stochastic rule tries them in that
  order. `fed`: set when the drafter fed another tree than this one (GSD's graph), see `TreeDrafter.follow`.
- `tree_attention(parents, prefix, pending, dtype)`: THE tree/forest attention mask (additive 4D) and
  position ids, batched over rows (a single tree is one row; beams pass a forest per row).
- `TreeKV(model, pending, cache=None)`: a model's KV cache holding a committed prefix (a given cache's tokens)
  plus tree nodes.
  `feed(tree, nodes)` runs ONE forward pass over the pending committed tokens (causal) and the
  given nodes (tree attention: each node sees the prefix, its ancestors and itself, at position
  prefix + depth - 1) and returns the logits: row 0 for the root (only if pending tokens were fed),
  then one row per node given (a chain of nodes needs no mask: it is fed causally). `commit(tree,
  path, extra)` keeps the prefix plus the accepted path's keys and values (`kv.compact`, in place);
  path nodes the model never saw and `extra` become pending. The draft model of a tree method uses
  it the same way as the target.
- `TreeVerifier(ctx)`: the target's side (like `speculation.ChainVerifier`: the prompt is folded
  into the first pass). `step(tree, rule=None)` feeds the prompt/last token plus every node in one
  target pass, verifies (greedy: the longest path equal to the target's argmax; sampling:
  recursive rejection sampling over siblings, `verify.verify_tree`), emits the path's tokens plus
  the correction/bonus token with `proposed=len(tree)`, keeps only the path in the cache, and
  returns the accepted node indices. `rule(tree, logits) -> (path, token)` replaces the default
  rule; `logits[0]` is the root's row and `logits[1 + i]` node i's (the `row` helper).
- `TreeDrafter(ctx)`: the draft model's side (its own `TreeKV`): `start` (root logits), `expand`
  (logits of new nodes, one draft pass), `follow(tree, path, token)` after each target step. On a
  batch of rows, all on the model's device with one host transfer each: `probs` (the draft
  distributions over the target vocabulary), `top` (the most likely tokens, with their
  log-probabilities if asked), `sample` (i.i.d. draws), `distinct` (draws without replacement),
  `children` (a tree's next siblings by the rule its tree declares); `grow_levels` grows a tree level
  by level with a batched per-level choice of children.

The loop (`tree_method.TreeMethod`): build a `DraftTree` with the drafter, `path = verifier.step(tree)`,
`drafter.follow(tree, path, verifier.pending)`.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from methods.base import DecodeContext
from methods.common import vocab
from methods.common.kv import compact, forward, new_cache
from methods.common.sampling import on_target_vocab, warp
from methods.common.verify import verify_tree

ROOT = -1


def row(node: int) -> int:
    """The logits row of `node` in a `TreeVerifier` pass (row 0 is the root)."""
    return node + 1


class DraftTree:
    def __init__(self, replacement: bool = False) -> None:
        self.replacement = replacement  # siblings drawn i.i.d. (with replacement) from their parent's q
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.children: dict[int, dict[int, int]] = {ROOT: {}}  # parent -> {token: node}
        self.draws: dict[int, list[int]] = {ROOT: []}  # parent -> children in draw order
        self.dists: dict[int, torch.Tensor] = {}  # parent -> q its children were drawn from
        # (tree the drafter fed, {node here: the node there standing for it in the same context, or None})
        self.fed: tuple[DraftTree, dict[int, int | None]] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """Append `token` under `parent` (ROOT or a node); return its node (an existing sibling if repeated)."""
        if parent != ROOT and not 0 <= parent < len(self.tokens):
            raise IndexError(f"parent {parent} is not a node of this tree ({len(self.tokens)} nodes)")
        token = int(token)
        siblings = self.children[parent]
        if token in siblings:
            node = siblings[token]
            if self.replacement and parent in self.dists:
                self.draws[parent].append(node)  # an i.i.d. draw that repeated: tried again by the rule
            return node
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        self.children[node], self.draws[node] = {}, []
        siblings[token] = node
        self.draws[parent].append(node)
        return node

    def add_path(self, tokens: list[int], parent: int = ROOT) -> list[int]:
        """Append a sequence below `parent` (merging shared prefixes); return its nodes."""
        nodes = []
        for tok in tokens:
            parent = self.add(parent, tok)
            nodes.append(parent)
        return nodes

    def set_dist(self, parent: int, q: torch.Tensor) -> None:
        """The draft distribution (1-D, target vocabulary) that `parent`'s children are drawn from."""
        self.dists[parent] = q

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def level(self, depth: int) -> list[int]:
        return [i for i, d in enumerate(self.depths) if d == depth]

    def leaves(self) -> list[int]:
        return [i for i in range(len(self.tokens)) if not self.children[i]]


def tree_attention(parents: list[list[int]], prefix: int, pending: int, dtype: torch.dtype,
                   new: int | None = None, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive 4D mask (rows x 1 x q x kv) and position ids (rows x q) for one forward pass over
    `pending` causal tokens then tree nodes, on top of `prefix` cached tokens every query sees.

    Row r's keys are: the prefix, the pending tokens, then `len(parents[r])` tree slots, where
    `parents[r][k]` is slot k's parent slot (an earlier one) or -1 (a child of the last pending token /
    the root). The queries are the pending tokens and the last `new` slots (default: all, all rows the
    same count); slots before them were fed in earlier passes and are in the cache. Shorter rows are
    padded with dummy slots that see only the prefix, the pending tokens and themselves (junk logits).
    A slot sees the prefix, the pending tokens, its ancestors and itself, at position
    prefix + pending + depth - 1. Additive float (0 / dtype min), not bool: eager attention adds it.
    """
    slots = max((len(p) for p in parents), default=0)
    rows, new = len(parents), slots if new is None else new
    if all(len(p) == slots for p in parents):
        table = np.array(parents, dtype=np.int64).reshape(rows, slots)
    else:
        table = np.full((rows, slots), -1, dtype=np.int64)
        for r, p in enumerate(parents):
            table[r, : len(p)] = p
    index = np.arange(slots)
    if (table >= index).any():
        raise ValueError(f"node {int((table >= index).any(0).argmax())}: its parent must come before it")
    # ancestors-or-self by pointer jumping, one level per round (rounds = the depth, not the nodes); in
    # numpy: these index arrays are tiny, and a torch call costs more than the work
    seen = np.zeros((rows, slots, slots + 1), dtype=bool)  # the last column collects the root
    parent_of = np.concatenate([table, np.full((rows, 1), slots)], 1)
    parent_of[parent_of < 0] = slots
    at, rr, kk = np.broadcast_to(index, (rows, slots)), np.arange(rows)[:, None], index[None]
    while True:
        seen[rr, kk, at] = True
        at = parent_of[rr, at]
        if (at == slots).all():
            break
    # keys after the prefix: the pending tokens (causal among themselves), then the tree slots
    q = pending + new
    visible = np.zeros((rows, q, pending + slots), dtype=bool)
    visible[:, :pending, :pending] = np.tri(pending, dtype=bool)
    visible[:, pending:, :pending] = True
    visible[:, pending:, pending:] = seen[:, slots - new:, :slots]
    positions = np.empty((rows, q), dtype=np.int64)
    positions[:, :pending] = np.arange(prefix, prefix + pending)
    positions[:, pending:] = visible[:, pending:].sum(-1) + (prefix - 1)  # pending + depth - 1, after the prefix
    mask = torch.zeros(rows, 1, q, prefix + pending + slots, dtype=dtype, device=device)
    mask[:, 0, :, prefix:].masked_fill_(torch.from_numpy(~visible).to(mask.device), torch.finfo(dtype).min)
    return mask, torch.from_numpy(positions).to(mask.device)


class TreeKV:
    """One model's KV cache: a committed prefix, then tree nodes in the order they were fed."""

    def __init__(self, model: torch.nn.Module, pending: list[int], cache: DynamicCache | None = None) -> None:
        self.model = model
        self.cache: DynamicCache = new_cache(model) if cache is None else cache  # a given cache: its tokens are the prefix
        self.pending = list(pending)  # committed tokens the model has not processed yet
        self.prefix = 0 if cache is None else cache.get_seq_length()  # committed tokens in the cache
        self.slots: dict[int, int] = {}  # tree node -> its slot (cache position - prefix)
        self.slot_parents: list[int] = []  # slot -> its parent's slot (-1: the root)
        self.dtype = next(model.parameters()).dtype

    def feed(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """One forward pass over the pending tokens and `nodes`; logits rows: root (if pending), then nodes."""
        if self.pending and self.slots:
            raise RuntimeError("pending committed tokens must be fed before any tree node")
        pending = self.pending
        if not pending and not nodes:
            raise ValueError("nothing to feed")
        for node in nodes:
            if node in self.slots:
                raise ValueError(f"node {node} was already fed")
            parent = tree.parents[node]
            if parent != ROOT and parent not in self.slots:
                raise ValueError(f"node {node}: its parent {parent} has not been fed to this model")
            self.slot_parents.append(ROOT if parent == ROOT else self.slots[parent])
            self.slots[node] = len(self.slots)
        device, kwargs = self.model.device, {}
        # tree attention, unless the slots form one chain (or there are none): then it is plain causal
        if self.slot_parents != list(range(-1, len(self.slot_parents) - 1)):
            mask, positions = tree_attention([self.slot_parents], self.prefix, len(pending), self.dtype,
                                             new=len(nodes), device=device)
            kwargs = {"attention_mask": mask, "position_ids": positions}
        ids = torch.tensor([pending + [tree.tokens[n] for n in nodes]], dtype=torch.long, device=device)
        keep = len(nodes) + (1 if pending else 0)
        out = forward(self.model, self.cache, input_ids=ids, logits_to_keep=keep, **kwargs)
        self.prefix, self.pending = self.prefix + len(pending), []
        return out.logits[0]

    def commit(self, tree: DraftTree, path: list[int], extra: list[int]) -> None:
        """Keep the prefix plus `path`'s fed nodes; the path's unfed remainder and `extra` become pending."""
        fed = 0
        while fed < len(path) and path[fed] in self.slots:
            fed += 1
        compact(self.cache, self.prefix, [self.prefix + self.slots[n] for n in path[:fed]])
        self.prefix += fed
        self.slots, self.slot_parents = {}, []
        self.pending = self.pending + [tree.tokens[n] for n in path[fed:]] + list(extra)


class TreeVerifier:
    """The target's side of draft-a-tree-then-verify (see the module docstring)."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.kv = TreeKV(ctx.target, ctx.prompt_ids)
        self.last_logits: torch.Tensor | None = None

    @property
    def pending(self) -> int:
        """The last emitted token (the target has not processed it yet)."""
        return self.kv.pending[-1]

    def room(self, depth: int) -> int:
        """Tree depth worth drafting: the correction/bonus token always adds one more."""
        return max(0, min(depth, self.ctx.max_new_tokens - len(self.ctx.output) - 1))

    def step(self, tree: DraftTree, rule=None) -> list[int]:
        ctx = self.ctx
        logits = self.kv.feed(tree, list(range(len(tree))))
        self.last_logits = logits
        if rule is None:
            path, token = verify_tree(tree, logits, ctx.sampling, ctx.generator)
        else:
            path, token = rule(tree, logits)
        ctx.emit([tree.tokens[n] for n in path] + [token], proposed=len(tree))
        self.kv.commit(tree, path, [token])
        return path


class TreeDrafter:
    """The draft model's side of a tree method: its own `TreeKV`, which keeps the draft's keys and
    values of the accepted path (the path's nodes it never fed, and the correction token, are
    recomputed in the next step's first draft pass together with the root). Distributions stay on the
    draft's device; each helper moves one small batch of candidates to the host."""

    def __init__(self, ctx: DecodeContext) -> None:
        if ctx.draft is None:
            raise ValueError("this method needs a draft model (--draft)")
        self.ctx = ctx
        self.kv = TreeKV(ctx.draft, ctx.prompt_ids)
        self.vocab = ctx.target.config.vocab_size

    @property
    def last_token(self) -> int:
        """The last accepted token: the root of the next tree."""
        return self.kv.pending[-1]

    def start(self, tree: DraftTree) -> torch.Tensor:
        """The root's logits (one draft pass over the tokens accepted since the last step)."""
        return self.kv.feed(tree, [])[0]

    def expand(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """Logits after each of `nodes` (one draft pass with tree attention)."""
        return self.kv.feed(tree, nodes)

    def follow(self, tree: DraftTree, path: list[int], token: int) -> None:
        """After verification: keep the accepted path in the draft's cache. When the drafter fed another
        tree (`tree.fed`, e.g. GSD's graph), keep the nodes standing for the path up to the first one
        without a counterpart; the rest of the path is recomputed in the next draft pass."""
        if tree.fed is None:
            self.kv.commit(tree, path, [token])
            return
        source, counterpart = tree.fed
        kept = []
        for node in path:
            if counterpart.get(node) is None:
                break
            kept.append(counterpart[node])
        self.kv.commit(source, kept, [tree.tokens[n] for n in path[len(kept):]] + [token])

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (rows x V)."""
        return on_target_vocab(rows.reshape(-1, rows.shape[-1]), self.vocab)

    def probs(self, rows: torch.Tensor) -> torch.Tensor:
        """The draft's distributions over the target's vocabulary (rows x V, one batched softmax): the
        warped ones children are sampled from under sampling; the plain softmax under greedy decoding."""
        logits = self.logits(rows).float()
        return logits.softmax(-1) if self.ctx.sampling.greedy else warp(logits, self.ctx.sampling)

    def top(self, rows: torch.Tensor, k: int, logprobs: bool = False):
        """The k most likely draft tokens of each row, most likely first (list of lists), and with
        `logprobs` their log-probabilities under the plain softmax (greedy ranking and values)."""
        logits = self.logits(rows)
        tokens = vocab.top_k(logits, k)[1]
        if not logprobs:
            return tokens.tolist()
        values = vocab.log_probs_at(logits, tokens)
        return tokens.tolist(), values.tolist()

    def sample(self, probs: torch.Tensor, count: int) -> list[list[int]]:
        """`count` i.i.d. draws from each row of `probs`."""
        return vocab.sample(probs, count, self.ctx.generator).tolist()

    def distinct(self, probs: torch.Tensor, k: int, drawn: list | None = None) -> list:
        """Up to k draws without replacement from each row of `probs` (or a 1-D `probs`), in draw order,
        after `drawn`."""
        return vocab.sample_distinct(probs, k, self.ctx.generator, drawn)

    @staticmethod
    def at(probs: torch.Tensor, tokens: list[list[int]]) -> list[list[float]]:
        """probs[r, tokens[r]] for every row (ragged), in one gather and one transfer."""
        width = max((len(t) for t in tokens), default=0)
        index = torch.tensor([t + [0] * (width - len(t)) for t in tokens], dtype=torch.long, device=probs.device)
        return [row[: len(t)] for row, t in zip(probs.gather(-1, index.reshape(len(tokens), width)).tolist(), tokens)]

    def children(self, tree: DraftTree, nodes: list[int], rows: torch.Tensor, width: int) -> list[list[int]]:
        """`width` children for each of `nodes` (logits `rows`), in draw order. Greedy: the draft's top
        `width` (the greedy rule needs no distribution). Sampling: drawn from q, i.i.d. if
        `tree.replacement` (SpecInfer) else without replacement (RSD), with q recorded for the rule."""
        if self.ctx.sampling.greedy:
            return self.top(rows, width)
        q = self.probs(rows)
        for node, dist in zip(nodes, q):
            tree.set_dist(node, dist)
        return self.sample(q, width) if tree.replacement else self.distinct(q, width)

    def grow_levels(self, tree: DraftTree, widths, choose=None) -> None:
        """Grow `tree` level by level: `choose(nodes, rows, width)` (default: `children`) returns, for
        the frontier `nodes` and their logits `rows`, the tokens to draft under each node (in draw
        order); one draft pass per level feeds the new nodes (none after the last level)."""
        choose = choose or (lambda nodes, rows, width: self.children(tree, nodes, rows, width))
        frontier, rows = [ROOT], self.start(tree)[None]
        for level, width in enumerate(widths):
            new: list[int] = []
            for node, tokens in zip(frontier, choose(frontier, rows, width)):
                for token in tokens:
                    before = len(tree)
                    child = tree.add(node, token)
                    if len(tree) > before:
                        new.append(child)
            frontier = new
            if not frontier or level == len(widths) - 1:
                return
            rows = self.expand(tree, frontier)
