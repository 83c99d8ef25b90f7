"""Search space of `tdtf` (methods/tdtf.py), from ../shared/papers/000_234ffb67ab86a73c.txt. Literal data only.

The stages carry absolute budgets (epochs of the source set, Hyperparams fields with the paper's numbers), so no task
has a MAX_STEPS here: the stages define a trial's length and `--max-steps N` scales every stage to N steps in all.
"""

DEFAULT_TASK = "synthetic-endoscopy"  # the paper's headline setting (gastroscope → enteroscopy), at CPU size

# The synthetic tasks (64x64 / 64x128, 800 training images per domain): the small segmenter with live batch norm, batch
# 8 and the learning rate measured for source_only (search_spaces/source_only.py), so that the two compare at equal
# footing. CycleGAN parts at a quarter width (ngf = ndf = 16, SeUDA's synthetic setting) with 3 residual blocks: the
# generators are about 70% of a TD step's CPU time, and 6 blocks (as [44] below 256x256) would not fit the default
# sweep into 10 minutes. D_F with one stride-2 layer (the tiny encoder's 16x16 map cannot pass five; 4x4 P maps).
# A_F at 64 channels with 16 noise channels. T = 50 keeps the paper's 200 / 256 = 0.78 nats per latent channel for
# the 64 latent channels of ngf 16. TD keeps the printed learning rate 2.5e-4: 1e-3 and 2e-3 were tried here and
# translated no better (source lesions erased in T_D(x_s) either way), and at 2e-3 one early KL spike (about 4,000 per
# position) ratcheted λ_t to 0.1 for good under the printed max rule and collapsed T_D^{-1}'s latent. Budgets: TD
# 1 + 0.5 epochs (the printed 10 + 5 scaled by 1/10) and Steps I-III 0.5 : 0.25 : 0.25 epochs per round, 3 rounds:
# 750 steps per trial.
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "generator_filters": 16,
    "generator_blocks": 3,
    "patch_discriminator_filters": 16,
    "feature_discriminator_downsampling": 1,
    "augmentor_channels": 64,
    "augmentor_noise_channels": 16,
    "T": 50.0,
    "td_epochs_constant": 1.0,
    "td_epochs_decay": 0.5,
    "tf_segment_epochs": 0.5,
    "tf_augment_epochs": 0.25,
    "tf_align_epochs": 0.25,
}

# GTA5 and SYNTHIA: the printed 10 + 5 TD epochs per round over 24,966 or 9,400 source frames at batch 2 are 187,245
# and 70,500 steps per round, about 1.1 M and 0.42 M steps for three rounds of TD and TF: impractical, so we cut every
# epoch budget to a fifth (TD 2 + 1 epochs, Steps I-III 1.5 : 0.75 : 0.75 per round), a deviation from Sec. 3.5.
# A_F's N×N attention at 1280x720 (N = 160·90 = 14,400 positions at output stride 8) needs about 26 GB for 16 blocks
# at batch 2: `augmentor_downsample` 2 divides N by 4 and that memory by 16 (1280x760 for SYNTHIA likewise).
BENCHMARK_CUT = {
    "td_epochs_constant": 2.0,
    "td_epochs_decay": 1.0,
    "tf_segment_epochs": 1.5,
    "tf_augment_epochs": 0.75,
    "tf_align_epochs": 0.75,
    "augmentor_downsample": 2,
}
TASK_DEFAULTS = {
    "synthetic-endoscopy": SYNTHETIC,
    "synthetic-urban": SYNTHETIC,
    "endoscopy": {},  # the paper's own setting: every Hyperparams default as printed (Sec. 3.5, 4.1)
    "gta5-cityscapes": BENCHMARK_CUT,
    "synthia-cityscapes": BENCHMARK_CUT,
}

ABLATIONS = [
    {},
    {"quantified_transferability": False},
    {"pseudo_labelling": False},
    {"transferability_bottleneck": False},
    {"attention_on_attention": False},
]

GRIDS = {
    # Table 2 (endoscopy): Ours and its four ablations w/oQT, w/oPL, w/oTKB, w/oAA.
    "table2": ABLATIONS,
    # Table 3 (GTA5 → Cityscapes): the same five rows.
    "table3": ABLATIONS,
    # Table 4 (SYNTHIA → Cityscapes): the same five rows.
    "table4": ABLATIONS,
    # Fig. 4 (and Fig. 7 on the benchmarks): the alternation count; the paper converges at 3, the figure's ticks are
    # not in the text: 1 to 5 rounds, each round at the task's per-round budget.
    "fig4": {"alternations": [1, 2, 3, 4, 5]},
    # Fig. 4's "complementary effect" of the modules: both, TF alone (no translation), TD + Step I alone (no
    # feature augmentation, hence no D_F and no P).
    "complementary": [
        {},
        {"translation": False},
        {"feature_augmentation": False, "quantified_transferability": False},
    ],
    # Fig. 5a: the number of RA2B blocks, 16 chosen; the ticks are not in the text: 0 (A_F without attention blocks)
    # and powers of two around 16.
    "fig5a": {"num_ra2b": [0, 2, 4, 8, 16, 32]},
    # Fig. 6 left: {γ, λs(λt)} with λs = λt ("share same value in our experiments"); values not printed: a decade
    # each way around γ = 1e-6 and λ = 1e-4.
    "fig6_left": [
        {"gamma": 1e-7, "lambda_s": 1e-5, "lambda_t": 1e-5},
        {"gamma": 1e-7, "lambda_s": 1e-4, "lambda_t": 1e-4},
        {"gamma": 1e-7, "lambda_s": 1e-3, "lambda_t": 1e-3},
        {"gamma": 1e-6, "lambda_s": 1e-5, "lambda_t": 1e-5},
        {"gamma": 1e-6, "lambda_s": 1e-4, "lambda_t": 1e-4},
        {"gamma": 1e-6, "lambda_s": 1e-3, "lambda_t": 1e-3},
        {"gamma": 1e-5, "lambda_s": 1e-5, "lambda_t": 1e-5},
        {"gamma": 1e-5, "lambda_s": 1e-4, "lambda_t": 1e-4},
        {"gamma": 1e-5, "lambda_s": 1e-3, "lambda_t": 1e-3},
    ],
    # Fig. 6 right: {α, T} at γ = 1e-6, λ = 1e-4 (the caption fragment "(b) γ = 10−6, λs(λt) = 10−4"); values not
    # printed: a factor of 2 each way around α = 10 and T = 200 (T in the paper's units, 256 latent channels; the
    # synthetic default is 50 for 64 channels, so this grid loosens the bottleneck there).
    "fig6_right": {"alpha": [5.0, 10.0, 20.0], "T": [100.0, 200.0, 400.0]},
    # Not from the paper: each open reading of methods/tdtf.py's docstring switched away from its default on its own.
    "open_choices": [
        {},
        {"kl_reduction": "elements"},
        {"kl_reduction": "mean"},
        {"multiplier_update": "dual_ascent"},
        {"residual_transferability": False},
        {"transferability_source": "current"},
        {"pseudo_label_source": "round"},
        {"feature_discriminator_role": "domain"},
        {"ra2b_weights": "positions"},
        {"augmentor_downsample": 2},  # (the Cityscapes tasks already default to 2)
        {"td_gan_loss": "lsgan"},
        {"optimizer_scope": "trial"},
        {"optimizer_scope": "stage"},
    ],
}

# TPE / random search over the printed constants, about a decade around each (Fig. 6's ranges and a little beyond).
RANGES = {
    "alpha": ("loguniform", 2.0, 50.0),
    "T": ("loguniform", 10.0, 1000.0),
    "gamma": ("loguniform", 1e-8, 1e-4),
    "beta": ("uniform", 0.7, 0.99),
}
# Paper numbers beside the grids that reproduce them (`python -m platform.report` prints them next to ours), as
# printed in ../shared/papers/000_234ffb67ab86a73c.txt (checked against notes/tdtf.md): target mIoU and per-class IoU
# (%), the IoUs as the table's row in its column order. Keyed by grid, then task; a row names the grid point it is
# ("point", as in GRIDS) or, for a baseline row, the method whose defaults it is ("method": BL is DeepLab without
# transfer, our source_only; LtA is adaptsegnet). Metric names are ours (platform/metrics.py) without "val_target/".
# Table 2 prints the ablations' mIoU only; the full model's, BL's and LtA's IoUs per class are Table 1's.
# BL is not one network throughout: Tables 1-2's BL is "the baseline network DeepLab-v3 [9] without semantic
# transfer", which on endoscopy is `source_only --set architecture=deeplabv3_resnet101 learning_rate=2e-4
# batch_size=2` (methods/tdtf.py, reading 19; source_only's own defaults there are DeepLab-v2), while Tables 3-4's BL
# rows (36.6 GTA5, 33.5 SYNTHIA) are, value for value, the DeepLab-v2 "Source only [15]" rows that CSCL and CIRN print
# too, i.e. source_only's defaults. The report takes the source_only runs in the store as they are and does not
# check their backbone.
TDTF_CLASSES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
TDTF_CLASSES_16 = tuple(c for c in TDTF_CLASSES_19 if c not in ("terrain", "truck", "train"))
PAPER_RESULTS = {
    "table2": {
        "endoscopy": {
            "source": "Table 2 (ablations) and Table 1 (endoscopy, IoU normal / disease)",
            "classes": ("normal", "disease"),
            "rows": {
                "Ours": {"point": {}, "miou": 64.58, "iou": "85.48 43.67"},
                "Ours-w/oQT": {"point": {"quantified_transferability": False}, "miou": 61.47},
                "Ours-w/oPL": {"point": {"pseudo_labelling": False}, "miou": 61.35},
                "Ours-w/oTKB": {"point": {"transferability_bottleneck": False}, "miou": 62.73},
                "Ours-w/oAA": {"point": {"attention_on_attention": False}, "miou": 63.06},
                "BL [9]": {"method": "source_only", "miou": 53.56, "iou": "74.47 32.65"},
                "LtA [37]": {"method": "adaptsegnet", "miou": 60.70, "iou": "81.04 40.35"},
            },
        },
    },
    "table3": {
        "gta5-cityscapes": {
            "source": "Table 3 (GTA5 → Cityscapes val)",
            "classes": TDTF_CLASSES_19,
            "rows": {
                "Ours": {
                    "point": {},
                    "miou": 49.2,
                    "iou": "89.4 50.1 83.9 35.9 27.0 32.4 38.6 37.5 84.5 39.6 85.7 61.6 33.7 82.2 36.0 50.4 0.3 33.6 32.1",
                },
                "Ours-w/oQT": {
                    "point": {"quantified_transferability": False},
                    "miou": 45.7,
                    "iou": "89.0 40.0 83.4 34.0 23.7 32.2 36.6 33.1 84.0 39.3 74.3 58.9 27.2 78.8 32.6 35.1 0.1 28.4 37.4",
                },
                "Ours-w/oPL": {
                    "point": {"pseudo_labelling": False},
                    "miou": 46.4,
                    "iou": "90.6 40.8 84.1 31.3 22.7 32.0 39.0 33.7 84.3 39.5 80.7 58.4 28.7 82.8 27.4 48.1 1.0 27.0 28.5",
                },
                "Ours-w/oTKB": {
                    "point": {"transferability_bottleneck": False},
                    "miou": 47.5,
                    "iou": "88.9 45.2 82.9 32.7 26.6 31.5 34.8 34.3 83.5 38.8 81.5 60.0 31.5 80.6 30.8 44.9 5.2 33.8 35.4",
                },
                "Ours-w/oAA": {
                    "point": {"attention_on_attention": False},
                    "miou": 48.0,
                    "iou": "89.1 49.8 82.7 32.8 26.6 32.0 35.8 32.4 83.1 37.2 83.8 58.7 32.9 81.0 34.9 47.1 1.5 33.1 36.8",
                },
                "BL": {
                    "method": "source_only",
                    "miou": 36.6,
                    "iou": "75.8 16.8 77.2 12.5 21.0 25.5 30.1 20.1 81.3 24.6 70.3 53.8 26.4 49.9 17.2 25.9 6.5 25.3 36.0",
                },
                "LtA [37]": {
                    "method": "adaptsegnet",
                    "miou": 42.4,
                    "iou": "86.5 36.0 79.9 23.4 23.3 23.9 35.2 14.8 83.4 33.3 75.6 58.5 27.6 73.7 32.5 35.4 3.9 30.1 28.1",
                },
            },
        },
    },
    "table4": {
        "synthia-cityscapes": {
            "source": "Table 4 (SYNTHIA → Cityscapes val, 16 classes)",
            "classes": TDTF_CLASSES_16,
            "rows": {
                "Ours": {
                    "point": {},
                    "miou": 47.2,
                    "iou": "81.7 43.8 80.1 22.3 0.5 29.4 28.6 21.2 83.4 82.3 63.1 26.2 83.7 34.9 26.3 48.4",
                },
                "Ours-w/oQT": {
                    "point": {"quantified_transferability": False},
                    "miou": 44.2,
                    "iou": "69.4 30.9 79.8 21.3 0.5 30.2 31.0 22.7 82.3 82.6 66.4 15.2 79.1 20.5 26.7 48.2",
                },
                "Ours-w/oPL": {
                    "point": {"pseudo_labelling": False},
                    "miou": 44.7,
                    "iou": "70.3 32.1 77.8 22.9 0.8 29.6 32.4 24.3 81.7 80.1 62.9 22.0 75.4 26.2 25.3 51.0",
                },
                "Ours-w/oTKB": {
                    "point": {"transferability_bottleneck": False},
                    "miou": 45.8,
                    "iou": "78.6 39.2 80.4 19.5 0.6 27.8 29.1 21.5 80.8 82.0 64.5 24.7 83.5 29.6 24.1 46.3",
                },
                "Ours-w/oAA": {
                    "point": {"attention_on_attention": False},
                    "miou": 46.2,
                    "iou": "81.3 41.5 79.2 21.8 0.7 28.3 27.6 20.1 81.7 80.9 62.7 25.3 82.1 34.5 23.6 47.3",
                },
                "BL": {
                    "method": "source_only",
                    "miou": 33.5,
                    "iou": "55.6 23.8 74.6 9.2 0.2 24.4 6.1 12.1 74.8 79.0 55.3 19.1 39.6 23.3 13.7 25.0",
                },
            },
        },
    },
}
