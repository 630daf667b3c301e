"""Moving cached keys (and queries) to other positions: RoPE composes, so rotating an already-rotated
vector by a position delta equals computing it at the new position.

Only the rotate-half layout of Llama, Mistral and Qwen2 is handled, and only RoPE types whose frequencies
do not depend on the sequence length (default, linear, llama3, yarn): a dynamic or longrope model changes
its frequencies with the length, so a delta rotation would not be exact there and is refused.
"""
from __future__ import annotations

import torch

_EXACT_TYPES = {"default", "linear", "llama3", "yarn"}


class Rotation:
    """The model's rotary frequencies, and `rotate(x, delta)`: x moved by `delta` positions."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().to(torch.float64)
        self._back: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of -p for p = 0, 1, ... (to_zero)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Rotation:
        rope_type = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in _EXACT_TYPES:
            raise NotImplementedError(f"re-rotating keys is exact only for RoPE types {sorted(_EXACT_TYPES)}; "
                                      f"this model uses {rope_type!r}")
        for module in model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor):
                return cls(inv_freq)
        raise NotImplementedError(f"{type(model).__name__} has no rotary embedding (no inv_freq buffer)")

    def table(self, delta: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `delta` (positions to add) times each frequency: [..., half], float32 at least.
        Angles in float64, since positions times frequency reach 1e4 radians and more."""
        angles = delta.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(like.device)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor,
               table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [..., n, head_dim] rotated at some positions, moved by `delta` (broadcastable to [..., n], one per
        row); `table` is `self.table(delta, x)` when already computed (one move applied to every layer)."""
        half = x.shape[-1] // 2
        if self.inv_freq.numel() != half:
            raise NotImplementedError(f"partial rotary embeddings are not handled ({2 * self.inv_freq.numel()} of "
                                      f"{x.shape[-1]} dims rotated)")
        cos, sin = table if table is not None else self.table(delta, x)
        # in float32 at least: a bf16 key moved by -1 at every decoding step would drift (a bf16 cos/sin table
        # turns it by the wrong angle each time: 95% error after 1000 moves; float32 math: one rounding per move)
        y = x.to(cos.dtype)
        y1, y2 = y[..., :half], y[..., half:]
        return torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin), dim=-1).to(x.dtype)

    def to_zero(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., n, head_dim] rotated at `positions` [n], moved to position 0 (cos/sin tables kept and grown:
        a policy moving the whole cache every step would otherwise recompute them)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        back = self._back
        if back is None or back[0].shape[0] < need or back[0].device != x.device:
            size = max(need, 2 * (back[0].shape[0] if back is not None else 0), 1024)
            back = self._back = self.table(-torch.arange(size, device=x.device), x)
        return self.rotate(x, positions, (back[0][positions], back[1][positions]))
