"""Search space of `cirn` (methods/cirn.py), from ../shared/papers/004_f2fbc54fd8dcd3d8.txt. Literal data only.

Stage budgets are absolute (Hyperparams `source_steps`, `translation_steps`, `adaptation_steps`,
`self_training_steps`): the stages define a trial's length, so there is no MAX_STEPS; `--max-steps N` scales every
stage proportionally to N steps in all.
"""

DEFAULT_TASK = "synthetic-urban"

# The CPU setting of the synthetic task: the small segmenter at batch 8 with live batch norm and the learning rate
# measured for source_only; CycleGAN parts at a quarter width with 6 residual blocks (as search_spaces/seuda.py; the
# synthetic scenes are 64x128) on full frames. Stage budgets: S 200 steps, the CycleGAN 300, stage 2 300 (the
# source_only and adaptsegnet budget on this task), stage 3 200, so that `python -m platform.sweep cirn` (two full
# trials, one core each) fits in 10 minutes on 2 cores. The GAN learning rate is 1e-3 (the paper's 2e-4 is for
# 100,000 iterations at batch 1; at 300 steps it barely moves the palette: a CPU-budget choice, measured).
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "generator_filters": 16,
    "generator_blocks": 6,
    "patch_discriminator_filters": 16,
    "gan_learning_rate": 1e-3,
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

# Random search / TPE around the paper's studies: λ_cos and ε over their grids' spans, K over Table 3's (randint's high
# bound is exclusive: 0-4), λ_adv a decade each way.
RANGES = {
    "lambda_cos": ("loguniform", 1.0, 80.0),
    "epsilon": ("uniform", 0.1, 1.0),
    "K": ("randint", 0, 5),
    "lambda_adv": ("loguniform", 1e-4, 1e-2),
}
