"""Token-tree machinery: tree attention equals causal attention along every path, the cache keeps
exactly the accepted path, and the multi-draft rules give the target's distribution exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from methods.base import DecodeContext, Sampling
from methods.common.kv import compact, extend, new_cache
from methods.common.sampling import sample
from methods.common.tree import ROOT, DraftTree, TreeKV, TreeVerifier, row, tree_attention
from methods.common.verify import (
    verify_siblings,
    verify_tree_greedy,
    verify_tree_stochastic,
)
from tests.conftest import tiny_llama
from tests.test_verification_rule import V, assert_matches, tables

PREFIX = [4, 9, 13, 7, 22]


def sample_tree() -> DraftTree:
    tree = DraftTree()
    tree.add_path([5, 6, 7])
    tree.add_path([5, 8])  # shares the first token: merged into a trie
    tree.add_path([9, 10, 11, 12])
    tree.add(ROOT, 30)
    return tree


def causal_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]


def test_add_path_merges_shared_prefixes():
    tree = sample_tree()
    assert tree.tokens == [5, 6, 7, 8, 9, 10, 11, 12, 30]
    assert tree.parents == [-1, 0, 1, 0, -1, 4, 5, 6, -1]
    assert tree.depths == [1, 2, 3, 2, 1, 2, 3, 4, 1]
    assert tree.path(7) == [4, 5, 6, 7] and tree.leaves() == [2, 3, 7, 8]
    assert tree.draws[ROOT] == [0, 4, 8]
    with pytest.raises(IndexError):
        tree.add(42, 1)


# ---- the one tree/forest mask builder reproduces the two it replaced (their code as of 9e26726) ----

def old_tree_mask(tree, nodes, slots, prefix, pending, dtype):
    width = pending + len(nodes)
    kv = prefix + pending + len(slots)
    visible = torch.zeros(width, kv, dtype=torch.bool)
    visible[:, : prefix + pending] = True
    visible[:pending, prefix : prefix + pending] = torch.ones(pending, pending, dtype=torch.bool).tril()
    start = prefix + pending
    positions = list(range(prefix, start))
    for r, node in enumerate(nodes, start=pending):
        for anc in tree.path(node):
            visible[r, slots[anc]] = True
        positions.append(start + tree.depths[node] - 1)
    mask = torch.zeros(width, kv, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None], torch.tensor([positions], dtype=torch.long)


def old_forest_mask(forest, prefix, width, nodes, dtype):
    q = width + nodes
    visible = torch.zeros(len(forest), q, prefix + q, dtype=torch.bool)
    positions = torch.zeros(len(forest), q, dtype=torch.long)
    visible[:, :, :prefix] = True
    visible[:, :width, prefix : prefix + width] = torch.ones(width, width, dtype=torch.bool).tril()
    positions[:, :width] = torch.arange(prefix, prefix + width)
    start = prefix + width
    for r, row_nodes in enumerate(forest):
        depth = []
        for k in range(nodes):
            visible[r, width + k, prefix : prefix + width] = True
            visible[r, width + k, start + k] = True
            if k >= len(row_nodes):
                positions[r, width + k] = start
                continue
            parent = row_nodes[k][1]
            depth.append(1 if parent < 0 else depth[parent] + 1)
            while parent >= 0:
                visible[r, width + k, start + parent] = True
                parent = row_nodes[parent][1]
            positions[r, width + k] = start + depth[k] - 1
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[:, None], positions


def random_parents(rng, n):
    return [int(rng.integers(-1, k)) if k else -1 for k in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_tree_attention_equals_the_old_tree_mask(seed):
    """A tree fed in two passes (the first with the pending tokens, or not), as TreeKV feeds it."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    parents = random_parents(rng, n)
    tree = DraftTree()
    for k, parent in enumerate(parents):
        tree.tokens.append(k)
        tree.parents.append(parent)
        tree.depths.append(1 if parent < 0 else tree.depths[parent] + 1)
    prefix, earlier = int(rng.integers(0, 9)), int(rng.integers(0, n))
    pending = 0 if earlier else int(rng.integers(0, 4))
    new = list(range(earlier, n))
    slots = {k: prefix + pending + k for k in range(n)}
    for dtype in (torch.float32, torch.bfloat16):
        want_mask, want_pos = old_tree_mask(tree, new, slots, prefix, pending, dtype)
        got_mask, got_pos = tree_attention([parents], prefix, pending, dtype, new=len(new))
        assert torch.equal(got_mask, want_mask) and torch.equal(got_pos, want_pos)


@pytest.mark.parametrize("seed", range(20))
def test_tree_attention_equals_the_old_forest_mask(seed):
    """Beams' forests: a ragged forest per row (shorter rows padded with dummy nodes)."""
    rng = np.random.default_rng(seed)
    forest = [[(0, p) for p in random_parents(rng, int(rng.integers(0, 12)))] for _ in range(int(rng.integers(1, 5)))]
    nodes = max(len(f) for f in forest)
    if not nodes:
        return
    prefix, width = int(rng.integers(0, 9)), int(rng.integers(1, 4))
    want_mask, want_pos = old_forest_mask(forest, prefix, width, nodes, torch.float32)
    got_mask, got_pos = tree_attention([[p for _, p in f] for f in forest], prefix, width, torch.float32)
    assert torch.equal(got_mask, want_mask) and torch.equal(got_pos, want_pos)


def test_tree_attention_rejects_a_parent_after_its_child():
    with pytest.raises(ValueError, match="node 1"):
        tree_attention([[-1, 2, 0]], 0, 1, torch.float32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tree_attention_equals_causal_logits_along_every_path(attention):
    model = tiny_llama(seed=3)
    model.config._attn_implementation = attention
    tree = sample_tree()
    kv = TreeKV(model, PREFIX)
    logits = kv.feed(tree, list(range(len(tree))))
    assert logits.shape[0] == len(tree) + 1
    reference = causal_logits(model, PREFIX)
    torch.testing.assert_close(logits[0], reference[-1], atol=1e-4, rtol=1e-4)
    for node in range(len(tree)):
        seq = PREFIX + [tree.tokens[n] for n in tree.path(node)]
        torch.testing.assert_close(logits[row(node)], causal_logits(model, seq)[-1], atol=1e-4, rtol=1e-4)


def test_tree_fed_level_by_level_equals_one_pass():
    """A drafter feeds a tree in several passes (one per level); the rows must not change."""
    model = tiny_llama(seed=3)
    tree = sample_tree()
    whole = TreeKV(model, PREFIX).feed(tree, list(range(len(tree))))
    kv = TreeKV(model, PREFIX)
    rows = {ROOT: kv.feed(tree, [])[0]}
    for depth in range(1, tree.depth + 1):
        nodes = tree.level(depth)
        rows.update(zip(nodes, kv.feed(tree, nodes)))
    for node, got in rows.items():
        torch.testing.assert_close(got, whole[row(node)], atol=1e-4, rtol=1e-4)


def test_a_chain_is_fed_causally_with_the_same_logits():
    """A chain (every node the child of the one before) needs no tree mask: TreeKV feeds it causally."""
    model = tiny_llama(seed=3)
    tree = DraftTree()
    tree.add_path([5, 6, 7, 8])
    kv = TreeKV(model, PREFIX)
    rows = [kv.feed(tree, [0, 1])[-2:], kv.feed(tree, [2]), kv.feed(tree, [3])]
    reference = causal_logits(model, PREFIX + [5, 6, 7, 8])[-4:]
    torch.testing.assert_close(torch.cat(rows), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fed_depth", [4, 2])
def test_commit_keeps_exactly_the_accepted_path(fed_depth):
    """After commit, the next pass gives the same logits as a cache built causally from the accepted
    tokens, whether the model saw the whole path (target) or only its first levels (draft)."""
    model = tiny_llama(seed=3)
    tree = sample_tree()
    kv = TreeKV(model, PREFIX)
    kv.feed(tree, [n for n in range(len(tree)) if tree.depths[n] <= fed_depth])
    path = tree.path(7)
    kv.commit(tree, path, [17])
    accepted = PREFIX + [tree.tokens[n] for n in path] + [17]
    assert kv.prefix + len(kv.pending) == len(accepted)
    assert kv.pending == accepted[kv.prefix:]
    follow = DraftTree()
    follow.add_path([18, 19])
    got = kv.feed(follow, [0, 1])
    expected = causal_logits(model, accepted + [18, 19])[-3:]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_compact_keeps_the_prefix_and_the_path_of_every_layer():
    model = tiny_llama(seed=3)
    cache = new_cache(model)
    extend(model, PREFIX + [30, 31, 32], cache)
    before = [layer.keys.clone() for layer in cache.layers]
    compact(cache, 3, [4, 6])
    assert cache.get_seq_length() == 5
    for old, layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, old[:, :, [0, 1, 2, 4, 6]])
    compact(cache, 3, [3, 4])  # already in place: only cut
    assert cache.get_seq_length() == 5


def test_greedy_tree_walk_takes_the_longest_argmax_path():
    tree = sample_tree()
    logits = torch.full((len(tree) + 1, 40), -1.0)
    def choose(r, tok):
        logits[r, tok] = 1.0
    for r, tok in ((0, 9), (row(4), 10), (row(5), 11), (row(6), 3)):
        choose(r, tok)
    assert verify_tree_greedy(tree, logits) == ([4, 5, 6], 3)
    logits[0, 9] = -5.0
    choose(0, 31)
    assert verify_tree_greedy(tree, logits) == ([], 31)


def test_tree_verifier_emits_path_and_bonus_and_keeps_cache_consistent():
    model = tiny_llama(seed=3)
    ctx = DecodeContext(prompt_ids=PREFIX, target=model, sampling=Sampling(), max_new_tokens=50,
                        eos_token_ids=frozenset())
    verifier = TreeVerifier(ctx)
    greedy = causal_logits(model, PREFIX)[-1].argmax().item()
    tree = DraftTree()
    tree.add(ROOT, (greedy + 1) % 40)
    tree.add(ROOT, greedy)
    path = verifier.step(tree)
    assert path == [1] and len(ctx.output) == 2 and ctx.output[0] == greedy
    assert ctx.trace.proposed == [2] and ctx.trace.accepted == [2]
    second = DraftTree()
    second.add(ROOT, 0)
    verifier.step(second)
    nxt = causal_logits(model, PREFIX + ctx.output[:2])[-1].argmax().item()
    assert ctx.output[2] == nxt


# ---- the multi-draft rule reproduces the target's distribution exactly (tiny vocabulary) ----

def gumbel_top_k(q: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k tokens sampled without replacement from q, in draw order (Gumbel-Top-k)."""
    u = torch.rand(q.shape, generator=generator).clamp(1e-12, 1 - 1e-12)
    keys = torch.where(q > 0, q.log() - (-u.log()).log(), torch.tensor(float("-inf")))
    return torch.topk(keys, k).indices.tolist()


def draw_children(q_row, k, mode, generator):
    if mode == "iid":
        return [sample(q_row, generator) for _ in range(k)]
    if mode == "without":
        return gumbel_top_k(q_row, k, generator)
    return torch.topk(q_row, k).indices.tolist()  # deterministic: the draft's top-k


def tree_sequence(p, q, first, k, depth, mode, generator, length=3):
    """Emit `length` tokens by drafting a k-ary tree from the Markov draft q and verifying with p."""
    out, last = [], first
    while len(out) < length:
        tree = DraftTree(replacement=mode == "iid")
        frontier = [(ROOT, last)]
        for _ in range(depth):
            nxt = []
            for node, tok in frontier:
                if mode != "deterministic":
                    tree.set_dist(node, q[tok])
                for child_tok in draw_children(q[tok], k, mode, generator):
                    child = tree.add(node, child_tok)
                    if tree.depths[child] < depth and (child, child_tok) not in nxt:
                        nxt.append((child, child_tok))
            frontier = nxt
        context = [last] + tree.tokens
        probs = torch.stack([p[c] for c in context])  # row 0 = root, row 1 + i = node i
        path, token = verify_tree_stochastic(tree, probs, generator)
        out += [tree.tokens[n] for n in path] + [token]
        last = out[-1]
    return tuple(out[:length])


@pytest.mark.parametrize("mode,k", [("iid", 3), ("without", 2), ("deterministic", 2)])
def test_tree_rule_matches_target_distribution(mode, k):
    """3 emitted tokens from depth-2 trees (64 outcomes, chi-square, fixed seed)."""
    target_logits, draft_logits = tables(4)
    p, q = target_logits.softmax(-1), draft_logits.softmax(-1)
    assert_matches(p, 0, lambda g: tree_sequence(p, q, 0, k, 2, mode, g), draws=6000)


@pytest.mark.parametrize("replacement", [True, False])
def test_siblings_rule_single_step_distribution(replacement):
    """One node, 3 drafted children from a draft far from the target: the emitted token follows p."""
    p = torch.tensor([0.05, 0.5, 0.05, 0.4])
    q = torch.tensor([0.6, 0.1, 0.25, 0.05])
    g = torch.Generator().manual_seed(99)
    draws = 8000
    counts = np.zeros(V)
    for _ in range(draws):
        children = [sample(q, g) for _ in range(3)] if replacement else gumbel_top_k(q, 3, g)
        _, token = verify_siblings(children, q, p, replacement, g)
        counts[token] += 1
    assert chisquare(counts, p.numpy() * draws).pvalue > 1e-3


def test_without_replacement_needs_its_own_rule():
    """The with-replacement rule applied to drafts drawn without replacement is biased: the test
    above would catch a verifier that ignored how the drafts were drawn."""
    p = torch.tensor([0.05, 0.5, 0.05, 0.4])
    q = torch.tensor([0.6, 0.1, 0.25, 0.05])
    g = torch.Generator().manual_seed(99)
    draws = 8000
    counts = np.zeros(V)
    for _ in range(draws):
        _, token = verify_siblings(gumbel_top_k(q, 3, g), q, p, True, g)
        counts[token] += 1
    assert chisquare(counts, p.numpy() * draws).pvalue < 1e-6
