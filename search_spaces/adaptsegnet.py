"""Search space of `adaptsegnet` (methods/adaptsegnet.py). Literal data only."""

DEFAULT_TASK = "synthetic-urban"

# The synthetic tasks use the small network with live batch norm, batch 8 and the learning rate measured for
# source_only (search_spaces/source_only.py), so that the two are compared at equal footing.
SYNTHETIC = {"architecture": "tiny", "freeze_batchnorm": False, "learning_rate": 1e-2, "batch_size": 8}
TASK_DEFAULTS = {"synthetic-urban": SYNTHETIC, "synthetic-endoscopy": SYNTHETIC, "synthetic-cxr": SYNTHETIC}

# Optimiser steps per trial. gta5-cityscapes: the reference implementation trains 250,000 iterations and stops early
# at 150,000 (Tsai et al. Sec. 4); we use the early-stopped count.
MAX_STEPS = {"synthetic-urban": 300, "synthetic-endoscopy": 300, "synthetic-cxr": 300, "gta5-cityscapes": 150_000}

GRIDS = {
    # Not from a figure of the papers here (AdaptSegNet's own paper is not in ../shared/papers): a log-spaced bracket
    # around the paper default 0.001, over one order of magnitude each way.
    "lambda_adv": {"lambda_adv": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
}

RANGES = {
    "lambda_adv": ("loguniform", 1e-4, 1e-1),
    "learning_rate": ("loguniform", 1e-3, 5e-2),
}
