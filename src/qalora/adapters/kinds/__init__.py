"""Adapter kinds: ``base`` (the Kind record), one file per kind, ``registry`` (KINDS)."""
