"""The in-memory quantized head computes exactly its stored form."""

import pytest
import torch

from qalora.decode import quantize_head
from qalora.errors import QaloraError
from qalora.nn.quant_linear import QuantLinear
from qalora.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_head_is_its_rtn_form(tiny_model, bits):
    w = tiny_model.get_output_embeddings().weight.detach().clone()
    emb = tiny_model.get_input_embeddings().weight.detach().clone()
    head = quantize_head(tiny_model, bits, 32, kernel="reference")
    codes, scale, offset = rtn_quantize(w, bits, 32)
    assert isinstance(tiny_model.get_output_embeddings(), QuantLinear)
    assert torch.equal(head.quantized_weight().codes(), codes)
    naive = (codes.float().view(w.shape[0], -1, 32) * scale[..., None] + offset[..., None]).view_as(w)
    h = torch.randn(3, 5, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.lm_head(h), h @ naive.t(), rtol=0, atol=1e-5)  # fp32 GEMM order
        ids = torch.tensor([[1, 2, 3]])
        assert tiny_model(ids).logits.shape == (1, 3, w.shape[0])
    assert torch.equal(tiny_model.get_input_embeddings().weight, emb)  # the lookup keeps its weight
    assert tiny_model.config.tie_word_embeddings is False


def test_head_errors(tiny_model):
    with pytest.raises(QaloraError, match="group_size 48"):
        quantize_head(tiny_model, 4, 48)
    quantize_head(tiny_model, 4, 32)
    with pytest.raises(QaloraError, match="already quantized"):
        quantize_head(tiny_model, 4, 32)
