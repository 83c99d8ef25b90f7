"""Search space of `seuda` (methods/seuda.py), from ../shared/papers/003_2b3d70deb7bd4c82.txt. Literal data only."""

DEFAULT_TASK = "synthetic-cxr"

# The CPU setting of the synthetic task: the small segmenter at batch 8 with the learning rate measured for
# source_only, and CycleGAN parts at a quarter width with 6 residual blocks ([16] uses 6 below 256x256; the
# synthetic X-rays are 64x64).
SYNTHETIC = {
    "architecture": "tiny",
    "learning_rate": 1e-2,
    "batch_size": 8,
    "generator_filters": 16,
    "generator_blocks": 6,
    "discriminator_filters": 16,
    "segmenter_epochs": 3.0,
    "gan_epochs": 3.0,
}
TASK_DEFAULTS = {"synthetic-cxr": SYNTHETIC}

# Trial length: the stages' own budgets. montgomery-jsrt: the paper defaults, 200 source epochs per stage at batch
# size 1 over the 96 Montgomery training images (7:1:2 of 138), 19,200 steps each. synthetic-cxr: 3 epochs each,
# 300 + 300 steps over 800 images at batch 8 (the CPU setting above).

GRIDS = {
    # Table 1 and its stability study (Sec. 3): SeUDA and CyUDA (λ = 0) over 10 seeds; the paper reports the std of
    # Dice (0.25% vs 2.03%) and ASD (0.16 vs 1.19 mm). As a sweep, pass `--set segmenter_weights=PATH` so that every
    # trial's GANs start from one segmenter (methods/seuda.py); benchmarks/seuda_table1.py --stability does so.
    "table1_stability": {"lambda_sem": [0.5, 0.0], "seed": list(range(10))},
    # Table 1 rows without target labels: T-noDA, T-HistM, CyUDA, SeUDA. As a grid each trial trains its own
    # segmenter (and T-noDA/T-HistM only a segmenter); the paper tests ONE segmenter under every setting:
    # benchmarks/seuda_table1.py runs that protocol (with S-test), reusing one stage-1 checkpoint per seed.
    "table1": [{"adaptation": "none"}, {"adaptation": "histogram"}, {"lambda_sem": 0.0}, {}],
}

# TPE / random search over the weights of Eq. 4, a factor of about 3 to 10 around the paper's {0.5, 10, 0.5}.
RANGES = {
    "alpha": ("loguniform", 0.1, 2.0),
    "beta": ("loguniform", 1.0, 30.0),
    "lambda_sem": ("loguniform", 0.05, 2.0),
}
# Paper numbers beside the grids that reproduce them (`python -m platform.report` prints them next to ours): Table 1
# of ../shared/papers/003_2b3d70deb7bd4c82.txt as printed, per lung: Dice, recall, precision (%) and ASD (mm). The
# paper reports JSRT test (the task's `--split test`); sweeps evaluate on JSRT val. Keyed by grid, then task; a row
# names the grid point it is ("point", as in GRIDS). Metric names are ours (platform/metrics.py) without the
# "val_target/" prefix; the report averages the lungs as the paper's text does ("average Dice over both lungs").
PAPER_RESULTS = {
    "table1": {
        "montgomery-jsrt": {
            "source": "Table 1 (Montgomery → JSRT test)",
            "metric": "dice",
            "rows": {
                "SeUDA": {
                    "point": {},
                    "dice/right_lung": 95.59,
                    "recall/right_lung": 96.55,
                    "precision/right_lung": 94.77,
                    "asd_mm/right_lung": 2.85,
                    "dice/left_lung": 93.42,
                    "recall/left_lung": 92.40,
                    "precision/left_lung": 94.70,
                    "asd_mm/left_lung": 3.51,
                },
                "T-noDA": {
                    "point": {"adaptation": "none"},
                    "dice/right_lung": 82.29,
                    "recall/right_lung": 98.40,
                    "precision/right_lung": 73.38,
                    "asd_mm/right_lung": 10.68,
                    "dice/left_lung": 76.65,
                    "recall/left_lung": 95.06,
                    "precision/left_lung": 69.15,
                    "asd_mm/left_lung": 11.40,
                },
                "T-HistM": {
                    "point": {"adaptation": "histogram"},
                    "dice/right_lung": 90.05,
                    "recall/right_lung": 92.96,
                    "precision/right_lung": 88.05,
                    "asd_mm/right_lung": 5.72,
                    "dice/left_lung": 91.03,
                    "recall/left_lung": 94.35,
                    "precision/left_lung": 88.45,
                    "asd_mm/left_lung": 4.66,
                },
                "CyUDA": {
                    "point": {"lambda_sem": 0.0},
                    "dice/right_lung": 94.09,
                    "recall/right_lung": 96.31,
                    "precision/right_lung": 92.28,
                    "asd_mm/right_lung": 3.88,
                    "dice/left_lung": 91.59,
                    "recall/left_lung": 92.28,
                    "precision/left_lung": 91.70,
                    "asd_mm/left_lung": 4.57,
                },
            },
        },
    },
}
