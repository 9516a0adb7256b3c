"""The code widths qalora stores (torch-free, so configs and ``qalora --help`` import nothing heavy)."""

SUPPORTED_BITS = (2, 3, 4, 8)
