"""The exact merge of an adapted layer into its group-wise triple (codes, scale, offset).

An :class:`~qalora.adapters.layer.AdaptedLinear` on a ``QuantLinear`` computes with the base's
triple after its triple kinds (scales, LoTA codes + remainder) plus its output kinds (QA-LoRA's
pooled path, an offset per (row, group)). Every such kind lands on the triple, so::

    t       = layer.effective_triple(fp64)                     # kinds' transforms, in fp64
    q'      = t.codes                                          # integers in [0, 2^b - 1]
    scale'  = t.scale                                          # fp32 values already (see kinds.scales)
    offset' = fp32( t.offset + sum of output kinds' offset_delta )   # one rounding

The merged layer computes the same function as the adapted one up to that one rounding of each
offset (half an fp32 ulp). Parts a kind may not change are shared with the base, untouched
(``torch.equal`` holds by construction and is checked again before a merge is written).
"""

from __future__ import annotations

import torch

from qalora.adapters.kinds.registry import get_kind
from qalora.adapters.layer import AdaptedLinear
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.packing import pack


def check_exact(layer: AdaptedLinear, name: str = "layer") -> None:
    """Refuse a layer holding a kind without an exact merge, or one not on a ``QuantLinear``."""
    lossy = [k for k in layer.kinds if not get_kind(k).exact]
    if lossy:
        raise QaloraError(f"{name} holds a {lossy[0]!r} adapter (a dense update): it does not merge exactly into "
                          "INTn weights; lora/qlora adapters need the lossy --requantize rtn|gptq path")
    if not isinstance(layer.base, QuantLinear):
        raise QaloraError(f"cannot merge into a {type(layer.base).__name__} at {name}: the exact merge needs a "
                          "group-wise QuantLinear with float offsets")


@torch.no_grad()
def merged_triple(layer: AdaptedLinear, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], scale fp32 [out, G], offset fp32 [out, G])`` of the merged layer.

    Refuses (a ``QaloraError`` naming the layer) codes that are not integers in range, and scales
    that are not positive, finite fp32 numbers — which the kinds prevent by construction."""
    check_exact(layer, name)
    t = layer.effective_triple(torch.float64)
    offset = t.offset
    for kind in map(get_kind, layer.kinds):
        if kind.output is not None:
            offset = offset + kind.offset_delta(layer)
    top = 2**layer.bits - 1
    if not (torch.equal(t.codes, t.codes.round()) and bool(((t.codes >= 0) & (t.codes <= top)).all())):
        raise QaloraError(f"merge of {name}: codes leave the integers 0..{top} (a bug: kinds keep codes in range)")
    scale = t.scale.to(torch.float32)
    if not (torch.equal(scale.double(), t.scale) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
        raise QaloraError(f"merge of {name}: a scale is not a positive finite fp32 number")
    if not bool(torch.isfinite(offset).all()):
        raise QaloraError(f"merge of {name}: an offset is not finite")
    return t.codes.to(torch.uint8), scale, offset.to(torch.float32)


def merge_layer(layer: AdaptedLinear, name: str = "layer") -> QuantLinear:
    """A new ``QuantLinear`` computing ``layer`` (base + adapters) with everything folded into its
    triple. Parts its kinds may not change are the base's very tensors; ``layer`` is unchanged."""
    base = layer.base
    changes = {c for k in layer.kinds for c in get_kind(k).changes}
    codes, scale, offset = merged_triple(layer, name)
    merged = QuantLinear(base.in_features, base.out_features, base.bits, base.group_size, bias=base.bias is not None,
                         device="meta", kernel=base.kernel)
    merged.qweight = pack(codes, base.bits) if "codes" in changes else base.qweight
    merged.scale = scale if "scale" in changes else base.scale
    merged.offset = offset if "offset" in changes else base.offset
    if base.bias is not None:
        merged.bias = base.bias
    return merged
