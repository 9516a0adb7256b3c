"""The merge, stage by stage: ``exact`` (the tensor math per adapted layer), ``surgery`` (swapping
modules), ``verify`` (per-layer fp64, logits in fp64/fp32, noise floors), ``requantize`` (the
baselines' lossy path) and ``command`` (``qalora merge``: files in, checked checkpoint out).
This package imports nothing on its own."""
