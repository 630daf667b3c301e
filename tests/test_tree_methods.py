"""Each tree method's own drafting, verified by the shared rule, emits the target's distribution
exactly (temperature 1, tiny vocabulary, a Markov draft and target, chi-square with a fixed seed)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from methods.base import Sampling, get_method
from methods.common.tree import TreeDrafter
from methods.common.verify import verify_tree_stochastic
from tests.test_verification_rule import V, assert_matches, tables

LENGTH = 2


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of steps on 4-token rows: intra-op threads only add their fork/join (ms on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SETTINGS = {
    "specinfer_tree": {"expansion": (2, 2)},
    "rsd_c": {"branching": (2, 2)},
    "rsd_s": {"beam_width": 2, "depth": 2},
    "dyspec": {"budget": 4},
    "gsd": {"candidates": 2, "sibling_threshold": 0.0, "prob_threshold": 0.0, "repeat_threshold": 0, "max_depth": 2},
}


class MarkovDrafter(TreeDrafter):
    """`TreeDrafter` (its own distributions, top-k and draws) with a Markov draft in place of a model:
    the next-token logits depend on the last token only."""

    def __init__(self, ctx, draft_logits: torch.Tensor, last: int) -> None:
        self.ctx, self.table, self.vocab, self.last = ctx, draft_logits, V, last

    @property
    def last_token(self) -> int:
        return self.last

    def start(self, tree):
        return self.table[self.last]

    def expand(self, tree, nodes):
        return self.table[[tree.tokens[n] for n in nodes]]


def method_sequence(method, p, draft_logits, first, generator):
    ctx = SimpleNamespace(sampling=Sampling(temperature=1.0), generator=generator)
    out, last = [], first
    while len(out) < LENGTH:
        tree = method.draft_tree(ctx, MarkovDrafter(ctx, draft_logits, last), LENGTH)
        rows = torch.stack([p[t] for t in [last] + tree.tokens])
        path, token = verify_tree_stochastic(tree, rows, generator)
        out += [tree.tokens[n] for n in path] + [token]
        last = out[-1]
    return tuple(out[:LENGTH])


def markov_tables():
    """A sharp draft far from the target: siblings drawn without replacement differ a lot from q."""
    target_logits, draft_logits = tables(0)
    return target_logits.softmax(-1), draft_logits * 3.0


def check_method(name):
    p, draft_logits = markov_tables()
    method = get_method(name)(**SETTINGS[name])
    assert_matches(p, 1, lambda g: method_sequence(method, p, draft_logits, 1, g), draws=4000, length=LENGTH)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_method_tree_matches_target_distribution(name):
    check_method(name)


def test_the_check_catches_a_wrong_sibling_rule(monkeypatch):
    """Verifying Gumbel-Top-k siblings as if they were i.i.d. draws is biased, and the check sees it."""
    from methods.common import verify

    plain = verify.verify_siblings
    monkeypatch.setattr(verify, "verify_siblings", lambda tokens, q, p, replacement, g: plain(tokens, q, p, True, g))
    with pytest.raises(AssertionError, match="differs from the target"):
        check_method("rsd_c")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_method_tree_shape(name):
    """The drafted tree respects the method's size knobs and records how siblings were drawn."""
    _, draft_logits = tables(5)
    ctx = SimpleNamespace(sampling=Sampling(temperature=1.0), generator=torch.Generator().manual_seed(0))
    tree = get_method(name)(**SETTINGS[name]).draft_tree(ctx, MarkovDrafter(ctx, draft_logits, 1), LENGTH)
    assert 1 <= len(tree) <= 6 and tree.depth <= LENGTH
    for parent, draws in tree.draws.items():
        if draws and name != "gsd":  # gsd drafts the deterministic top-n: no distribution
            assert parent in tree.dists
        if not tree.replacement:
            assert len(set(draws)) == len(draws)


@pytest.mark.parametrize("name,settings", [("specinfer_tree", {"expansion": "2,1,2,1"}), ("rsd_c", {"branching": "3,1,1,1"})])
def test_identical_draft_accepts_the_whole_depth_every_step(name, settings, pair):
    """With the target as its own draft, greedy top-k trees always contain the target's path: every
    step accepts the full depth plus the bonus token, which holds only if the draft's cache follows
    the accepted path correctly from step to step."""
    from methods.base import DecodeContext

    target, _ = pair
    ctx = DecodeContext(prompt_ids=[4, 6, 9, 7, 8], target=target, draft=target, sampling=Sampling(),
                        max_new_tokens=25, eos_token_ids=frozenset())
    get_method(name)(**settings).generate(ctx)
    assert ctx.trace.accepted == [5, 5, 5, 5, 5]


@pytest.mark.parametrize("name,settings", [
    ("specinfer_tree", {"expansion": "2,0"}), ("rsd_c", {"branching": "two"}), ("rsd_s", {"beam_width": 0}),
    ("dyspec", {"budget": 0}), ("gsd", {"repeat_threshold": -2}),
])
def test_bad_settings_fail_when_the_method_is_built(name, settings):
    with pytest.raises(ValueError, match=name.split("_")[0]):
        get_method(name)(**settings)
