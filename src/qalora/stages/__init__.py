"""Whole-path commands built from the stage functions: ``pipeline`` (the main job)."""
