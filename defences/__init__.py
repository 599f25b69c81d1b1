"""Cleaning defences: their names and the options each takes, with defaults.

Plain data like objectives/__init__.py (params validation reads it without torch);
`defences.registry` builds them: `get_defence(name, **options)`. A new defence is one module (a
`Defence`: an objective and an optional `prepare` of the model), one line here and one in registry.py.
"""
OPTIONS: dict[str, dict[str, float]] = {
    "cleanclip": {"mmcl": 1.0, "ssl": 1.0},  # CleanCLIP: MMCL+SSL with lambda1 = lambda2 = 1
    "mmcl": {},
    "ssl": {},
    "shrink_perturb": {"shrink": 0.95, "perturb": 1e-4, "mmcl": 1.0, "ssl": 1.0},  # then CleanCLIP's fine-tuning
}
