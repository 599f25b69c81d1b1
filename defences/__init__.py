"""Defences: their names and the options each takes, with defaults. Cleaning defences (OPTIONS) fine-tune a
pre-trained model (the clean stage); pre-training defences (PRETRAINING) change how a model is pre-trained,
under any objective (the pretrain stage; "none": no defence).

Plain data like objectives/__init__.py (params validation reads it without torch);
`defences.registry` builds them: `get_defence(name, **options)`, `get_pretraining_defence(name, **options)`.
A new defence is one module (a `defences.base.Defence` or `PretrainingDefence`), one line here and one in
registry.py.
"""
OPTIONS: dict[str, dict[str, float]] = {
    "cleanclip": {"mmcl": 1.0, "ssl": 1.0},  # CleanCLIP: MMCL+SSL with lambda1 = lambda2 = 1
    "mmcl": {},
    "ssl": {},
    "shrink_perturb": {"shrink": 0.95, "perturb": 1e-4, "mmcl": 1.0, "ssl": 1.0},  # then CleanCLIP's fine-tuning
    "par": {"weight": 0.5, "bound": 2.15},  # Perturb-and-Recover: w and tau of the reference code
}

PRETRAINING: dict[str, dict[str, float]] = {
    "none": {},
    # the caption pool (the reference: 21,845 of CC3M's 3M; here a fifth of the 10k default) and the period of
    # the matching epochs (the reference: every 2nd)
    "roclip": {"pool": 2048, "every": 2},
    # unimodal warm-up epochs (the reference: 5 of 32; here 1 of 8), cross-modal warm-up epochs (the reference's 1),
    # the first split's p_safe threshold, the safe share's growth per epoch and its cap (the reference's 0.9, 0.01, 0.85)
    "safeclip": {"warmup": 1, "crossmodal": 1, "threshold": 0.9, "growth": 0.01, "max_share": 0.85},
}
