"""Exporters from a qalora checkpoint to formats other runtimes load (``gguf``: llama.cpp)."""
