"""The code widths qalora stores (torch-free, so configs and ``qalora --help`` import nothing heavy)."""

SUPPORTED_BITS = (2, 3, 4, 8)
# widths the packed storage holds: the quantizers' and those of imported files (GGUF Q5_*, Q6_K)
STORED_BITS = (2, 3, 4, 5, 6, 8)
