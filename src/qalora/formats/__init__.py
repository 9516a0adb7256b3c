"""Foreign quantized storage formats and their exact codecs to qalora's per-group affine form (``gguf_types``)."""
