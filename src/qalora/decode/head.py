"""The output head quantized in memory for decoding (``--head-bits``).

At this model size the fp32 head is most of the bytes read per generated token (SmolLM2-135M:
49,152 x 576 fp32 = 113 MB, against 80 MB for all 210 INT4 decoder linears). ``quantize_head``
replaces it by a ``QuantLinear`` of the same weight, RTN per (row, group of L input columns)::

    W [V, d]  ->  codes q [V, d], scale s, offset o [V, d / L];  head(h) = h (s·q + o)^T

so the head then computes exactly its stored form, like every other quantized layer (2-4 bits on
the int4 kernel). A tied input embedding keeps its own full-precision weight (the lookup reads one
row per token); the model's config is marked untied so nothing ties them again.
"""

from __future__ import annotations

import torch

from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.qparams import check_group_size
from qalora.quant.rtn import rtn_quantize
from qalora.quant.weight import QuantizedWeight


def quantize_head(model, bits: int, group_size: int = 32, kernel: str = "auto") -> QuantLinear:
    """Replace ``model``'s output head by its ``bits``-bit RTN ``QuantLinear`` (in place) and return it."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        raise QaloraError("the output head is already quantized; load the model again to quantize it differently")
    if not isinstance(head, torch.nn.Linear):
        raise QaloraError(f"the output head is a {type(head).__name__}, not a Linear layer; head_bits needs a Linear head")
    weight = head.weight.detach()
    check_group_size(group_size, weight.shape[1], "lm_head")
    codes, scale, offset = rtn_quantize(weight.float(), bits, group_size, "lm_head")
    bias = None if head.bias is None else head.bias.detach()
    q = QuantLinear.from_quantized(QuantizedWeight.from_codes(codes, scale, offset, bits, group_size), bias=bias,
                                   kernel=kernel).to(weight.device)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.set_output_embeddings(q)
    return q
