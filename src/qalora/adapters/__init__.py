"""Adapters: the kind registry (``kinds/``), the adapted layer (``layer``), the training methods
as lists of kinds (``methods``), attaching them to a model (``attach``) and the adapter folder
(``format``). Import from the submodules; this package imports nothing on its own."""
