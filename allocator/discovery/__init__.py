"""Stage 1, model -> components: every adaptable module of a causal LM, labelled by layer, family and kind.

``component`` (the :class:`Component` dataclass, torch-free), ``components`` (``find_components``),
``classify`` (placement rules), ``architectures`` (rule tables per model type), ``modelio`` (loading configs
and models), ``inspect`` (the ``allocate inspect`` report).
"""
