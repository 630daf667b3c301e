"""Token trees drafted in one step and verified by the target in one forward pass.

API (shared by every tree, graph and beam method):

- `DraftTree(replacement=False)`: nodes 0..n-1 with `tokens[i]`, `parents[i]` (-1 = a child of the
  root, which is the last accepted token and is not a node) and `depths[i]` (1 for the root's
  children). `add(parent, token)` appends a node (parents always come before children) and merges
  a repeated sibling token into the existing node, so a set of drafted sequences becomes a trie.
  `set_dist(parent, q)` records the draft distribution `parent`'s children were drawn from; a parent
  without one is deterministic (point-mass drafts, e.g. Token Recycling, n-gram or beam tries).
  `draws[parent]` keeps the children in the order they were drawn (repeats allowed when
  `replacement=True`: i.i.d. draws); the stochastic rule tries them in that order.
- `TreeKV(model, pending)`: a model's KV cache holding a committed prefix plus tree nodes.
  `feed(tree, nodes)` runs ONE forward pass over the pending committed tokens (causal) and the
  given nodes (tree attention: each node sees the prefix, its ancestors and itself, at position
  prefix + depth - 1) and returns the logits: row 0 for the root (only if pending tokens were fed),
  then one row per node given. `commit(tree, path, extra)` keeps the prefix plus the accepted
  path's keys and values (gathered along the sequence); path nodes the model never saw and `extra`
  become pending. The draft model of a tree method uses it the same way as the target.
- `TreeVerifier(ctx)`: the target's side (like `speculation.ChainVerifier`: the prompt is folded
  into the first pass). `step(tree, rule=None)` feeds the prompt/last token plus every node in one
  target pass, verifies (greedy: the longest path equal to the target's argmax; sampling:
  recursive rejection sampling over siblings, `verify.verify_tree`), emits the path's tokens plus
  the correction/bonus token with `proposed=len(tree)`, keeps only the path in the cache, and
  returns the accepted node indices. `rule(tree, logits) -> (path, token)` replaces the default
  rule; `logits[0]` is the root's row and `logits[1 + i]` node i's (the `row` helper).
- `TreeDrafter(ctx)`: the draft model's side (its own `TreeKV`): `start` (root logits), `expand`
  (logits of new nodes, one draft pass), `commit(tree, path, [token])` after each target step,
  `dist` (the draft distribution over the target vocabulary), `grow_levels` (level-by-level
  growth with a per-node choice of children).

A method step is then: build a `DraftTree` with the drafter, `path = verifier.step(tree)`,
`drafter.commit(tree, path, [verifier.pending])`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from methods.base import DecodeContext
from methods.common.kv import forward, gather, new_cache
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


def tree_mask(
    tree: DraftTree, nodes: list[int], slots: dict[int, int], prefix: int, pending: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive 4D mask (1 x 1 x q x kv) and position ids (1 x q) for feeding `pending` causal tokens
    then `nodes` on top of a cache of `prefix` committed tokens and the tree nodes in `slots`
    (node -> cache position). `slots` must already include `nodes`' own positions.

    Additive float (0 / dtype min), not bool: eager attention adds the mask to the scores.
    """
    width = pending + len(nodes)
    kv = prefix + pending + len(slots)
    visible = torch.zeros(width, kv, dtype=torch.bool)
    visible[:, : prefix + pending] = True
    visible[:pending, prefix : prefix + pending] = torch.ones(pending, pending, dtype=torch.bool).tril()
    start = prefix + pending
    positions = list(range(prefix, start))
    for r, node in enumerate(nodes, start=pending):
        for anc in tree.path(node):
            if anc not in slots:
                raise ValueError(f"node {node}: ancestor {anc} has not been fed to this model")
            visible[r, slots[anc]] = True
        positions.append(start + tree.depths[node] - 1)
    mask = torch.zeros(width, kv, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None], torch.tensor([positions], dtype=torch.long)


class TreeKV:
    """One model's KV cache: a committed prefix, then tree nodes in the order they were fed."""

    def __init__(self, model: torch.nn.Module, pending: list[int]) -> None:
        self.model = model
        self.cache: DynamicCache = new_cache(model)
        self.pending = list(pending)  # committed tokens the model has not processed yet
        self.prefix = 0  # committed tokens in the cache
        self.slots: dict[int, int] = {}  # tree node -> cache position

    def feed(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """One forward pass over the pending tokens and `nodes`; logits rows: root (if pending), then nodes."""
        if self.pending and self.slots:
            raise RuntimeError("pending committed tokens must be fed before any tree node")
        pending = self.pending
        if not pending and not nodes:
            raise ValueError("nothing to feed")
        start = self.prefix + len(pending)
        for node in nodes:
            if node in self.slots:
                raise ValueError(f"node {node} was already fed")
            self.slots[node] = start + len(self.slots)  # tree slots follow the committed prefix
        dtype = next(self.model.parameters()).dtype
        mask, positions = tree_mask(tree, nodes, self.slots, self.prefix, len(pending), dtype)
        device = self.model.device
        ids = torch.tensor([pending + [tree.tokens[n] for n in nodes]], dtype=torch.long, device=device)
        keep = len(nodes) + (1 if pending else 0)
        out = forward(self.model, self.cache, input_ids=ids, attention_mask=mask.to(device),
                      position_ids=positions.to(device), logits_to_keep=keep)
        self.prefix, self.pending = start, []
        return out.logits[0]

    def commit(self, tree: DraftTree, path: list[int], extra: list[int]) -> None:
        """Keep the prefix plus `path`'s fed nodes; the path's unfed remainder and `extra` become pending."""
        fed = 0
        while fed < len(path) and path[fed] in self.slots:
            fed += 1
        keep = list(range(self.prefix)) + [self.slots[n] for n in path[:fed]]
        if len(keep) < self.cache.get_seq_length():
            gather(self.cache, keep)
        self.prefix = len(keep)
        self.slots = {}
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
        nodes = list(range(len(tree)))
        logits = self.kv.feed(tree, nodes)
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
    recomputed in the next step's first draft pass together with the root)."""

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

    def commit(self, tree: DraftTree, path: list[int], extra: list[int]) -> None:
        self.kv.commit(tree, path, extra)

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's distribution over the target's vocabulary: the warped one children are sampled
        from under sampling; under greedy decoding the plain softmax, used to rank and value children."""
        logits = on_target_vocab(logits.float().cpu(), self.vocab)
        return logits.softmax(-1) if self.ctx.sampling.greedy else warp(logits, self.ctx.sampling)

    def grow_levels(self, tree: DraftTree, widths: list[int], choose) -> None:
        """Grow `tree` level by level: `choose(node, q)` returns the tokens to draft under `node`
        (in draw order); one draft pass per level feeds the new nodes (none after the last level)."""
        frontier, rows = [ROOT], self.start(tree)[None]
        for level, width in enumerate(widths):
            new: list[int] = []
            for node, logits in zip(frontier, rows):
                q = self.dist(logits)
                for token in choose(node, q, width):
                    before = len(tree)
                    child = tree.add(node, token)
                    if len(tree) > before:
                        new.append(child)
            frontier = new
            if not frontier or level == len(widths) - 1:
                return
            rows = self.expand(tree, frontier)
