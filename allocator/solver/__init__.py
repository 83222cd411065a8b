"""Stage 4, utilities x budget -> ranks: the integer program (``scipy.optimize.milp``). numpy/scipy, never
torch.

``settings`` (``SolverSettings``, the rank grids), ``budget`` (the one cost function, budget parsing),
``program`` (grouping and the program's arrays), ``reduction`` (exact pre-solve), ``solve`` (build, solve,
decode).
"""
