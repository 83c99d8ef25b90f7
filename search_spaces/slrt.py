"""Search space of `slrt` (methods/slrt.py), from ../shared/papers/001_1bc4ba71fc4bf48c.txt. Literal data only."""

# The paper's main setting: weakly-labelled endoscopy (image-level labels on target, Sec. 4.2).
DEFAULT_TASK = "synthetic-endoscopy"

# The small CPU network on the synthetic tasks, at the footing source_only is measured with (batch 8, live batch
# norm, the recipe's SGD at 1e-2 with the poly schedule and the head at 10x), so that the two compare at equal network,
# batch and optimiser; SLIC regions of side 8 (about 64 per 64x64 image; the paper prints no SLIC parameter). Length:
# 600 steps = 6 target epochs of 800 images at batch 8, so that p climbs 25% → 50% (Alg. 1; 55% would be the 7th).
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "segmenter_optimizer": "sgd",
    "learning_rate": 1e-2,
    "lr_schedule": "poly",
    "batch_size": 8,
    "superpixel_size": 8,
    "num_steps": 600,
}
TASK_DEFAULTS = {
    "synthetic-endoscopy": SYNTHETIC,
    # Street scenes have no image-level labels: "we remove the classification head" (Sec. 4.3)
    "synthetic-urban": {**SYNTHETIC, "classification_head": False},
    "gta5-cityscapes": {"classification_head": False},
    "synthia-cityscapes": {"classification_head": False},
    # endoscopy: the Hyperparams defaults are the paper's (DeepLab-v3 ResNet-50, Adam 1e-4, batch 4)
}

# Trial length: the stage's own budget (`num_steps`; not printed in the paper: 9,500 = ten of Sec. 3.4's 950-step
# decay periods on the paper tasks); no MAX_STEPS. `--max-steps N` scales it for quick runs.

# The ablation rows of Tables 2-4 as switches (methods/slrt.py docstring, "Ablations").
BL = {"adversarial": False, "pseudo_labels": False, "semantic_transfer": False}
ROWS = {
    "BL": BL,
    "BL+AL": {"pseudo_labels": False, "semantic_transfer": False},
    "BL+AL+PL": {"semantic_transfer": False},
    "BL+AL+SRT": {"pseudo_labels": False},  # = Ours-woPL: Table 2 prints the same IoUs for both rows
    "BL+PL+SRT": {"adversarial": False},
    "Ours": {},
    "Ours-woCB": {"class_balance": False},
    "Ours-woSP": {"superpixels": False},
}

GRIDS = {
    # Table 2 (endoscopy, with the classification head): BL, BL+AL, BL+AL+PL, BL+AL+SRT (= Ours-woPL), BL+PL+SRT,
    # Ours, Ours-woCB, Ours-woSP.
    "table2": list(ROWS.values()),
    # Tables 3-4 (SYNTHIA/GTA5 → Cityscapes, no classification head in those tasks' defaults): the same rows without
    # woCB and woPL.
    "table3_4": [ROWS[name] for name in ("BL", "BL+AL", "BL+AL+PL", "BL+AL+SRT", "BL+PL+SRT", "Ours-woSP", "Ours")],
    # Fig. 5 left, {µ, η} "(a) when γ = 0.7, α = 1". The figure's ticks are not in the text: about a factor 3 around
    # the defaults µ = 10, η = 0.3 (µ = 0 and η = 0 are the BL+AL+PL and BL+PL+SRT rows above).
    "fig5_left": {"mu": [1.0, 3.0, 10.0, 30.0], "eta": [0.1, 0.3, 1.0], "alpha": [1.0], "gamma": [0.7]},
    # Fig. 5 right, {α, γ} "(b) when µ = 10, η = 0.3". Ticks not in the text: α = 0 (no ℓ1 term) to 3, γ = 0 (no
    # history) to 0.9 — the text credits both, "the importance of incorporating previously-learned features and
    # sparsity property".
    "fig5_right": {"alpha": [0.0, 0.3, 1.0, 3.0], "gamma": [0.0, 0.5, 0.7, 0.9], "mu": [10.0], "eta": [0.3]},
    # Not from the paper: each reading of what it leaves open switched away from the default on its own
    # (methods/slrt.py docstring, "Choices the paper leaves open").
    "open_choices": [
        {},
        {"refinement": "pixel"},
        {"centroid_features": "encoder"},
        {"centroid_normalisation": "image"},
        {"centroid_history": "mean"},
        {"srt_reduction": "mean"},
        {"superpixel_vote": "raster"},
        {"superpixel_source": "store"},
        {"target_loss_normalisation": "selected"},
        {"lr_decay_staircase": False},
        {"loss_reduction": "mean"},
        {"pseudo_label_forward": "eval"},
        {"portion_every": "source"},
    ],
}

# TPE / random search around Fig. 5's parameters.
RANGES = {
    "mu": ("loguniform", 0.01, 100.0),
    "eta": ("loguniform", 0.001, 3.0),
    "alpha": ("uniform", 0.0, 3.0),
    "gamma": ("uniform", 0.0, 0.95),
}
# Paper numbers beside the grids that reproduce them (`python -m platform.report` prints them next to ours), as
# printed in ../shared/papers/001_1bc4ba71fc4bf48c.txt (checked against notes/slrt.md): mIoU and per-class IoU (%), the
# IoUs as the table's row in its column order. Keyed by grid, then task; each row names the grid point it is (ROWS).
# Metric names are ours (platform/metrics.py) without the "val_target/" prefix. Table 2 prints Ours-woPL with
# BL+AL+SRT's IoUs (the same configuration here) but mIoU 61.69 instead of their mean 61.49, and BL+PL+SRT's mIoU as
# 63.58 (its IoUs' mean is 63.86): the rows below are as printed, except that BL+PL+SRT carries its mIoU only (its
# IoUs, 84.38 and 43.33, would fail the consistency check of tests/platform/test_report.py).
SLRT_CLASSES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
SLRT_CLASSES_16 = tuple(c for c in SLRT_CLASSES_19 if c not in ("terrain", "truck", "train"))
PAPER_RESULTS = {
    "table2": {
        "endoscopy": {
            "source": "Table 2 (endoscopy ablations, IoU normal / disease)",
            "classes": ("normal", "disease"),
            "rows": {
                "Ours": {"point": ROWS["Ours"], "miou": 63.96, "iou": "84.76 43.16"},
                "BL": {"point": ROWS["BL"], "miou": 54.19, "iou": "75.13 33.24"},
                "BL+AL": {"point": ROWS["BL+AL"], "miou": 59.54, "iou": "79.81 39.27"},
                "BL+AL+PL": {"point": ROWS["BL+AL+PL"], "miou": 62.07, "iou": "83.08 41.07"},
                "BL+AL+SRT": {"point": ROWS["BL+AL+SRT"], "miou": 61.49, "iou": "81.71 41.27"},
                "BL+PL+SRT": {"point": ROWS["BL+PL+SRT"], "miou": 63.58},  # its IoUs disagree with it (above)
                "Ours-woCB": {"point": ROWS["Ours-woCB"], "miou": 62.29, "iou": "84.08 40.51"},
                "Ours-woSP": {"point": ROWS["Ours-woSP"], "miou": 63.30, "iou": "84.22 42.37"},
            },
        },
    },
    "table3_4": {
        "synthia-cityscapes": {
            "source": "Table 3 (SYNTHIA → Cityscapes val, 16 classes)",
            "classes": SLRT_CLASSES_16,
            "rows": {
                "Ours": {
                    "point": ROWS["Ours"],
                    "miou": 42.9,
                    "iou": "68.4 30.1 74.2 21.5 0.4 29.2 29.3 25.1 80.3 81.5 63.1 16.4 75.6 13.5 26.1 51.9",
                },
                "BL": {
                    "point": ROWS["BL"],
                    "miou": 30.4,
                    "iou": "22.5 15.4 74.1 9.2 0.1 24.6 6.6 11.7 75.0 82.0 56.5 18.7 34.0 19.7 17.1 18.5",
                },
                "BL+AL": {
                    "point": ROWS["BL+AL"],
                    "miou": 36.3,
                    "iou": "74.4 30.5 75.8 13.2 0.2 19.7 4.4 4.9 78.2 82.7 44.4 16.0 63.2 33.3 13.5 26.2",
                },
                "BL+AL+PL": {
                    "point": ROWS["BL+AL+PL"],
                    "miou": 40.2,
                    "iou": "79.2 38.7 76.5 10.7 0.3 22.4 5.6 11.4 79.5 81.3 58.1 20.7 70.4 31.6 24.8 32.3",
                },
                "BL+AL+SRT": {
                    "point": ROWS["BL+AL+SRT"],
                    "miou": 39.0,
                    "iou": "79.9 38.2 77.1 9.7 0.2 21.1 6.8 7.6 76.1 81.6 54.8 21.3 66.2 30.8 21.6 30.6",
                },
                "BL+PL+SRT": {
                    "point": ROWS["BL+PL+SRT"],
                    "miou": 41.8,
                    "iou": "61.6 28.7 71.6 20.8 0.6 28.7 31.1 24.9 80.0 81.5 62.7 16.2 69.4 12.3 27.8 51.5",
                },
                "Ours-woSP": {
                    "point": ROWS["Ours-woSP"],
                    "miou": 42.3,
                    "iou": "67.2 29.4 73.5 21.2 0.7 28.4 29.7 24.5 79.9 81.1 62.9 15.8 72.8 12.6 26.5 51.2",
                },
            },
        },
        "gta5-cityscapes": {
            "source": "Table 4 (GTA5 → Cityscapes val)",
            "classes": SLRT_CLASSES_19,
            "rows": {
                "Ours": {
                    "point": ROWS["Ours"],
                    "miou": 47.2,
                    "iou": "92.7 48.0 78.8 25.7 27.2 36.0 42.2 45.3 80.6 14.6 66.0 62.1 30.4 86.2 28.0 45.6 35.9 16.8 34.7",
                },
                "BL": {
                    "point": ROWS["BL"],
                    "miou": 35.1,
                    "iou": "80.2 6.4 74.8 8.8 17.2 17.5 30.5 17.7 75.0 14.1 57.9 56.2 27.3 64.1 29.7 24.1 4.7 27.6 33.4",
                },
                "BL+AL": {
                    "point": ROWS["BL+AL"],
                    "miou": 41.2,
                    "iou": "86.3 32.2 79.8 22.0 22.2 27.1 33.5 20.1 80.3 21.5 75.5 59.0 25.4 73.1 28.0 32.2 5.4 27.3 31.5",
                },
                "BL+AL+PL": {
                    "point": ROWS["BL+AL+PL"],
                    "miou": 44.9,
                    "iou": "91.7 48.3 76.8 25.1 28.5 28.2 39.7 44.5 79.8 13.6 72.3 53.6 19.1 85.8 23.7 44.2 32.8 13.4 31.5",
                },
                "BL+AL+SRT": {
                    "point": ROWS["BL+AL+SRT"],
                    "miou": 44.3,
                    "iou": "92.4 49.8 73.6 25.3 28.3 24.5 40.9 45.0 79.2 14.2 70.4 50.1 18.6 86.6 22.3 45.4 30.3 11.9 32.8",
                },
                "BL+PL+SRT": {
                    "point": ROWS["BL+PL+SRT"],
                    "miou": 46.1,
                    "iou": "92.6 47.8 77.4 26.7 28.8 29.9 42.4 46.3 80.7 15.1 71.1 55.8 24.3 86.5 21.5 42.4 43.3 12.1 30.8",
                },
                "Ours-woSP": {
                    "point": ROWS["Ours-woSP"],
                    "miou": 46.7,
                    "iou": "92.4 47.3 78.5 25.4 27.8 34.8 42.0 44.6 79.8 15.3 67.1 60.5 30.7 86.3 26.4 43.7 36.1 14.8 33.2",
                },
            },
        },
    },
}
