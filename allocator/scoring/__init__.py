"""Stage 3, probe report -> utilities: what a rank-r adapter is worth on each module. numpy only, never torch.

``signals`` (probe statistics -> per-parameter value curves), ``utility`` (blend, priors, the
``UtilityTable``).
"""
