"""The skeleton every token-tree method shares: draft a tree, verify it in one target pass, keep the path.

A tree method with a draft model implements one hook, `draft_tree(ctx, drafter, depth) -> DraftTree`
(as transformers' `CandidateGenerator` implements only `get_candidates`); the loop, the verification
rule (`verify.verify_tree`, lossless), the target's and the draft's caches are here. A method without a
draft model (Token Recycling) sets `needs = Needs()`: its `draft_tree` gets `drafter=None` and builds the
tree from its own state, and the second hook, `learn`, sees every target pass after verification.
"""
from __future__ import annotations

import torch

from methods.base import DecodeContext, Method, Needs
from methods.common.tree import DraftTree, TreeDrafter, TreeVerifier


class TreeMethod(Method):
    needs = Needs(draft=True)
    lossless = True

    def draft_tree(self, ctx: DecodeContext, drafter: TreeDrafter | None, depth: int) -> DraftTree:
        """This step's tree, at most `depth` deep (`depth` >= 1: the tokens left to generate allow it)."""
        raise NotImplementedError

    def learn(self, ctx: DecodeContext, root: int, tree: DraftTree, logits: torch.Tensor) -> None:
        """After each verification: `logits` are the target's rows for `root` (the token the tree hung
        from) and every node of `tree`, in that order. Default: nothing."""

    def generate(self, ctx: DecodeContext) -> list[int]:
        verifier = TreeVerifier(ctx)
        drafter = TreeDrafter(ctx) if self.needs.draft else None
        while not ctx.done:
            root, depth = verifier.pending, verifier.room(ctx.max_new_tokens)
            # only the final token left: the target emits it alone (the draft catches up next step)
            tree = self.draft_tree(ctx, drafter, depth) if depth else DraftTree()
            path = verifier.step(tree)
            if drafter is not None:
                drafter.follow(tree, path, verifier.pending)
            self.learn(ctx, root, tree, verifier.last_logits)
        return ctx.output
