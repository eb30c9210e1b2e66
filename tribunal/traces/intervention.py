"""An intervention on the residual stream while the hf engine samples (`tribunal steer`'s arms): at one decoder
block, every generated position's output is shifted by a fixed vector (`add`) or has its component along a unit
direction projected out (`ablate`). The prompt is left as it is, so the first generated token is sampled from the
model's own distribution and every later one from the intervened model.

The hook runs before any other hook of the block (capture included), so the stored states at that layer are the
intervened ones, which is what the layers above computed from. It changes the block's output in place, in the
model's dtype: no copy of the hidden states per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TribunalError

KINDS = ("add", "ablate")


@dataclass(frozen=True)
class InterventionSpec:
    """What to do at which block: kind `add` shifts by `vector`; `ablate` projects out `vector` (a unit direction)."""

    kind: str
    layer: int
    vector: tuple

    @classmethod
    def from_settings(cls, settings: dict) -> "InterventionSpec":
        """From GenerateConfig.intervention (kind, layer, vector and what describes them)."""
        kind, layer, vector = settings.get("kind"), settings.get("layer"), settings.get("vector")
        if kind not in KINDS:
            raise TribunalError(f"intervention kind {kind!r}: choose {', '.join(KINDS)}")
        if vector is None or layer is None:
            raise TribunalError("an intervention needs a layer and a vector")
        return cls(kind, int(layer), tuple(float(x) for x in vector))


class Intervention:
    """A forward hook on `blocks[spec.layer]` that applies the spec at generated positions.

    The engine calls `leave_prompt(n)` before a batch's prompt forward: that forward's first n positions (all
    of the left-padded prompts) are left alone; every later forward is of generated tokens and is intervened on.
    """

    def __init__(self, blocks, spec: InterventionSpec):
        if not 0 <= spec.layer < len(blocks):
            raise TribunalError(f"intervention layer {spec.layer} is outside the model's {len(blocks)} layers")
        block = blocks[spec.layer]
        param = next(block.parameters())
        self.spec = spec
        vector = torch.tensor(spec.vector, dtype=torch.float32)
        if spec.kind == "ablate":
            vector = vector / vector.norm()
        self._vector = vector.to(param.device, param.dtype)
        self._skip = 0
        self._handle = block.register_forward_hook(self._hook, prepend=True)

    def leave_prompt(self, positions: int) -> None:
        """The next forward's first `positions` positions are prompt: not intervened on."""
        self._skip = int(positions)

    def _hook(self, module, inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        skip, self._skip = self._skip, 0
        if hidden.shape[-1] != self._vector.shape[0]:
            raise TribunalError(f"the intervention's vector has {self._vector.shape[0]} dimensions, layer "
                                f"{self.spec.layer}'s output {hidden.shape[-1]}")
        target = hidden[:, skip:]
        if not target.shape[1]:
            return None
        vector = self._vector.to(hidden.dtype)
        if self.spec.kind == "add":
            target.add_(vector)
        else:
            target.sub_((target @ vector)[..., None] * vector)
        return None

    def remove(self) -> None:
        self._handle.remove()
