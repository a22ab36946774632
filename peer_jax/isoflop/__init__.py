"""The isoFLOP study (He 2024, Hoffmann et al. 2022) as a library.

grids      the grids as data (budgets, methods, shapes)
generate   a grid → one gin run file per point, with the step count that realises its budget
plan       predicted CPU wall time of a grid from measured runs
sweep      runs (or prints the pod commands of) a grid, one `python -m peer_jax.train` per point
fit        Approach 2 (parabola vertex) and Approach 3 (L(N, D)) from finished runs
bootstrap  intervals over seeds and PEER's comparisons
plots      the figures of a fit
report     reads sweep roots, fits, writes the table, the JSON and the figures
ablation   the PEER ablation tables (paper Fig. 3a, 3b, Table 2)

Command lines: configs/isoflop/generate.py and plan.py, scripts/isoflop_sweep.py,
fit_isoflop.py (report) and ablation_table.py; those five modules also run as
`python -m peer_jax.isoflop.<module>`.
"""
