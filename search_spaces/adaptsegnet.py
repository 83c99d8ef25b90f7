"""Search space of `adaptsegnet` (methods/adaptsegnet.py). Literal data only."""

DEFAULT_TASK = "synthetic-urban"

# The synthetic tasks use the small network with live batch norm, batch 8 and the learning rate measured for
# source_only (search_spaces/source_only.py), so that the two are compared at equal footing, for 300 steps (the paper
# tasks: the dataclass's 150,000, the early-stopped count of the reference implementation).
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "num_steps": 300,
}
TASK_DEFAULTS = {"synthetic-urban": SYNTHETIC, "synthetic-endoscopy": SYNTHETIC, "synthetic-cxr": SYNTHETIC}

GRIDS = {
    # Not from a figure of the papers here (AdaptSegNet's own paper is not in ../shared/papers): a log-spaced bracket
    # around the paper default 0.001, over one order of magnitude each way.
    "lambda_adv": {"lambda_adv": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
    # Not from a paper: the grid benchmarks/search_efficiency.py trains in full (27 points x 3 seeds at 100 steps) to
    # measure how much of its compute random search, TPE, ASHA and PBT need to find its best point; the segmenter's
    # and the discriminator's learning rates and the adversarial weight, each a half decade around its default.
    "search_efficiency": {
        "learning_rate": [3e-3, 1e-2, 3e-2],
        "lambda_adv": [1e-4, 1e-3, 1e-2],
        "discriminator_learning_rate": [1e-5, 1e-4, 1e-3],
    },
}

RANGES = {
    "lambda_adv": ("loguniform", 1e-4, 1e-1),
    "learning_rate": ("loguniform", 1e-3, 5e-2),
}

# Population Based Training (--scheduler pbt) may change the adversarial weight and the learning rate while a trial runs.
PERTURBABLE = ("lambda_adv", "learning_rate")
