"""Search space of `cirn` (methods/cirn.py), from ../shared/papers/004_f2fbc54fd8dcd3d8.txt. Literal data only.

Stage budgets are absolute (Hyperparams `source_steps`, `translation_steps`, `adaptation_steps`,
`self_training_steps`): the stages define a trial's length, so there is no MAX_STEPS; `--max-steps N` scales every
stage proportionally to N steps in all.
"""

DEFAULT_TASK = "synthetic-urban"

# The CPU setting of the synthetic task: the small segmenter at batch 8 with live batch norm and the learning rate
# measured for source_only; CycleGAN parts at a quarter width with 6 residual blocks (as search_spaces/seuda.py; the
# synthetic scenes are 64x128), trained on random 32x32 crops (a CPU-budget choice: a step costs 5.6x less CPU than
# on full frames, measured 0.28 s vs 1.59 s; G translates full frames in stage 2, as on the paper tasks), at the
# paper's Adam 2e-4 (measured on seed 0, CIR row: 40.1 mIoU at 2e-4, 39.0 at 1e-3). Stage budgets: S 200 steps, the
# CycleGAN 300, stage 2 300 (the source_only and adaptsegnet budget on this task), stage 3 200: about 5.5 min of CPU
# per trial (0.09, 0.22, 0.70 and 0.10 s per step), so that `python -m platform.sweep cirn` (two full trials, one
# core each) fits in 10 minutes on an otherwise idle 2-core machine.
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "generator_filters": 16,
    "generator_blocks": 6,
    "patch_discriminator_filters": 16,
    "translation_crop": 32,
    "source_steps": 200,
    "translation_steps": 300,
    "adaptation_steps": 300,
    "self_training_steps": 200,
}

# The paper tasks: the dataclass defaults (DeepLab-v2 ResNet-101, batch 1, 100,000 iterations per stage) with the
# CycleGAN trained on 400x400 crops (CyCADA's GTA5 → Cityscapes setting; methods/cirn.py, choice 4).
PAPER = {"translation_crop": 400}
TASK_DEFAULTS = {"synthetic-urban": SYNTHETIC, "gta5-cityscapes": PAPER, "synthia-cityscapes": PAPER}

GRIDS = {
    # Table 3: K ∈ {0, ..., 4} attention modules, stage-2 results (no self-training) at λ_cos = 40, ε = 0.4.
    "table3": {"K": [0, 1, 2, 3, 4], "self_training": [False]},
    # Parameter analysis (Sec. "Parameter Analysis"): ε ∈ {0.1, 0.2, 0.4, 0.6, 0.8, 1} at K = 3, λ_cos = 10, judged
    # by D's loss (stage 2).
    "epsilon": {"epsilon": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0], "K": [3], "lambda_cos": [10.0], "self_training": [False]},
    # Parameter analysis: λ_cos ∈ {1, 10, 20, 40, 80} at ε = 0.4 (K not restated: 3, as in the ε study), stage 2.
    "lambda_cos": {"lambda_cos": [1.0, 10.0, 20.0, 40.0, 80.0], "epsilon": [0.4], "K": [3], "self_training": [False]},
    # Table 4 (ablation per stage, rows as reconstructed in the notes): SO, CIR, ASS, CIR+ASS, ASS+ST, CIR+ASS+ST.
    "table4": [
        {"use_cir": False, "adaptation": False, "self_training": False},
        {"adaptation": False, "self_training": False},
        {"use_cir": False, "self_training": False},
        {"self_training": False},
        {"use_cir": False},
        {},
    ],
    # Not from the paper: the readings of what it leaves open (methods/cirn.py docstring), each switched away from
    # the default on its own.
    "open_choices": [
        {},
        {"gan_mode": "vanilla"},
        {"lambda_cyc": 1.0},
        {"lambda_sem": 0.0},
        {"acm_init": "independent"},
        {"acm_attention": "multiply"},
        {"seg_loss_terms": "each"},
        {"detach_weight_map": True},
        {"discriminator_weight_decay": 0.0},
        {"pseudo_label_rule": "class_portion"},
        {"pseudo_label_rule": "argmax"},
        {"pseudo_label_mode": "online"},
    ],
}

# Random search / TPE around the paper's studies: λ_cos and ε over their grids' spans, K over Table 3's
# (randint's high bound is exclusive: 0-4), λ_adv a decade each way.
RANGES = {
    "lambda_cos": ("loguniform", 1.0, 80.0),
    "epsilon": ("uniform", 0.1, 1.0),
    "K": ("randint", 0, 5),
    "lambda_adv": ("loguniform", 1e-4, 1e-2),
}

# Paper numbers beside the grids that reproduce them (`python -m platform.report`), mIoU (%) as printed. Table 4's
# extracted text is garbled: rows read as in ../shared/papers/notes/cirn.md section 4 (six per dataset; SO, CIR+ASS and
# the full model are certain, being Tables 1-3's values; CIR vs ASS on SYNTHIA and both ASS+ST cells are not). Per-class
# IoU of the full model from Tables 1 and 2, in our class order (Cityscapes trainIds; SYNTHIA's 16 evaluated
# classes), named as in our metrics (platform/metrics.py: metric_key).
CITYSCAPES_19 = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
SYNTHIA_16 = tuple(c for c in CITYSCAPES_19 if c not in ("terrain", "truck", "train"))
TABLE4_POINTS = {
    "SO": {"use_cir": False, "adaptation": False, "self_training": False},
    "CIR": {"adaptation": False, "self_training": False},
    "ASS": {"use_cir": False, "self_training": False},
    "CIR+ASS": {"self_training": False},
    "ASS+ST": {"use_cir": False},
    "CIR+ASS+ST": {},
}
PAPER_RESULTS = {
    "table4": {
        "gta5-cityscapes": {
            "source": "Table 4 (GTAV → Cityscapes; rows reconstructed, ASS+ST uncertain); full-model IoU: Table 1",
            "classes": CITYSCAPES_19,
            "metric": "miou",
            "rows": {
                **{
                    name: {"point": TABLE4_POINTS[name], "miou": value}
                    for name, value in (("SO", 36.6), ("CIR", 42.7), ("ASS", 43.6), ("CIR+ASS", 46.1), ("ASS+ST", 44.2))
                },
                "CIR+ASS+ST": {
                    "point": {},
                    "miou": 49.1,
                    "iou": "91.5 48.7 85.2 33.1 26.0 32.3 33.8 34.6 85.1 43.6 86.9 62.2 28.5 84.6 37.9 47.6 0.0 35.0 36.0",
                },
            },
        },
        "synthia-cityscapes": {
            "source": "Table 4 (SYNTHIA → Cityscapes, 16 classes; rows reconstructed, CIR/ASS and ASS+ST uncertain); "
            "full-model IoU and the 13-class mIoU*: Table 2",
            "classes": SYNTHIA_16,
            "metric": "miou",
            "rows": {
                **{
                    name: {"point": TABLE4_POINTS[name], "miou": value}
                    for name, value in (("SO", 33.5), ("CIR", 39.7), ("ASS", 39.5), ("CIR+ASS", 41.5), ("ASS+ST", 40.8))
                },
                "CIR+ASS+ST": {
                    "point": {},
                    "miou": 43.9,
                    "miou13": 51.1,
                    "iou": "85.8 40.4 80.4 4.7 1.8 30.8 16.4 18.6 80.7 80.4 55.2 26.3 83.9 43.8 18.6 34.3",
                },
            },
        },
    },
    "table3": {
        task: {
            "source": f"Table 3 ({label}, stage 2: CIR+ASS without self-training)",
            "metric": "miou",
            "rows": {f"K={k}": {"point": {"K": k, "self_training": False}, "miou": v} for k, v in enumerate(values)},
        }
        for task, label, values in (
            ("gta5-cityscapes", "GTAV → Cityscapes", (44.5, 45.0, 46.1, 45.1, 44.6)),
            ("synthia-cityscapes", "SYNTHIA → Cityscapes", (39.9, 41.1, 41.5, 41.7, 40.8)),
        )
    },
}
