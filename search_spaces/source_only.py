"""Search space of `source_only` (methods/source_only.py). Literal data only; platform/ turns it into Tune objects.

No paper sweeps the source-only baseline: its grid below is a learning-rate bracket for the synthetic tasks, and its
defaults on the paper tasks are the paper defaults of the Hyperparams dataclass (nothing overridden).
"""

# What `python -m platform.sweep source_only` runs when no --task is given.
DEFAULT_TASK = "synthetic-urban"

# Per-task overrides of the Hyperparams defaults (the paper recipe applies to gta5-cityscapes as is). The synthetic
# tasks are tiny CPU problems: the small network, a batch of 8 with live batch norm, a larger learning rate
# (measured on synthetic-urban: 1e-2 converges within 300 steps).
# Trial length: `num_steps` (the paper tasks: the dataclass's 100,000 iterations at batch size 1, CIRN Implementation
# details; the synthetic tasks: 300 steps).
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "num_steps": 300,
}
TASK_DEFAULTS = {"synthetic-urban": SYNTHETIC, "synthetic-endoscopy": SYNTHETIC, "synthetic-cxr": SYNTHETIC}

# Named grids: {field: [values]} is a product; a list of {field: value} dicts is an explicit list of points.
# A grid may carry a "seed" axis; otherwise --seeds (default 0) is the seed axis.
GRIDS = {
    # Not from a paper: a half-decade bracket around the synthetic-task default, to check the baseline is not
    # handicapped by its learning rate when adaptation methods are compared against it.
    "lr": {"learning_rate": [3e-3, 1e-2, 3e-2]},
}

# Ranges for random search and TPE: (distribution, low, high) with distribution in uniform, loguniform, randint, or
# ("choice", [values]).
RANGES = {
    "learning_rate": ("loguniform", 1e-3, 5e-2),
}

# Population Based Training (--scheduler pbt) may change the learning rate while a trial runs.
PERTURBABLE = ("learning_rate",)
