"""Kernel names, torch-free (CLI choices; ``registry.KERNELS`` holds the kernels in this order)."""

KERNEL_NAMES = ("int4", "reference", "dense")
KERNEL_CHOICES = ("auto", *KERNEL_NAMES)
