"""Pre-training and cleaning objectives: their names and the weights each takes, with defaults.

This module is plain data (the only place an objective's default weights are set), so that params
validation (tasks/config.py) imports neither torch nor open_clip. `objectives.registry` maps the
same names to their implementations and builds them: `get_objective(name, **weights)`.
Adding an objective: one module with an `Objective` subclass (or a factory), one line here and one
in registry.py.
"""
WEIGHTS: dict[str, dict[str, float]] = {
    "mmcl": {},
    "ssl": {},
    "mmcl_ssl": {"mmcl": 1.0, "ssl": 1.0},  # lambda1, lambda2 (the study: 1, 1)
    "siglip": {},
    "cyclip": {"cross": 0.25, "inmodal": 0.25},  # CyCLIP's lambdas
    "mw_auc": {},
}
