"""The loop shared by tree methods with a draft model: draft a tree, verify it, follow the path."""
from __future__ import annotations

from methods.base import DecodeContext
from methods.common.tree import DraftTree, TreeDrafter, TreeVerifier


def parse_widths(text: str, name: str) -> list[int]:
    """'1,1,3' -> [1, 1, 3]; every entry a positive integer."""
    try:
        widths = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise ValueError(f"{name} must be comma-separated positive integers, got {text!r}")
    return widths


def run_tree_method(ctx: DecodeContext, draft_tree, follow=None) -> list[int]:
    """`draft_tree(drafter, max_depth) -> DraftTree` builds one step's tree (depth <= max_depth);
    `follow(drafter, tree, path, token)` updates the draft's cache after verification (default: keep
    the accepted path of `tree`, which must then be the tree the drafter fed)."""
    verifier, drafter = TreeVerifier(ctx), TreeDrafter(ctx)
    while not ctx.done:
        depth = verifier.room(ctx.max_new_tokens)
        # only the final token left: the target emits it alone (the draft catches up next step)
        tree = draft_tree(drafter, depth) if depth else DraftTree()
        path = verifier.step(tree)
        if follow is None:
            drafter.commit(tree, path, [verifier.pending])
        else:
            follow(drafter, tree, path, verifier.pending)
    return ctx.output
