"""Search space of `tdtf` (methods/tdtf.py), from ../shared/papers/000_234ffb67ab86a73c.txt. Literal data only.

The stages carry absolute budgets (epochs of the source set, Hyperparams fields with the paper's numbers), so no task
has a MAX_STEPS here: the stages define a trial's length and `--max-steps N` scales every stage to N steps in all.
"""

DEFAULT_TASK = "synthetic-endoscopy"  # the paper's headline setting (gastroscope → enteroscopy), at CPU size

# The synthetic tasks (64x64 / 64x128, 800 training images per domain): the small segmenter with live batch norm, batch
# 8 and the learning rate measured for source_only (search_spaces/source_only.py), so that the two compare at equal
# footing; CycleGAN parts at a quarter width with 6 residual blocks ([44] uses 6 below 256x256; SeUDA's synthetic
# setting); D_F with one stride-2 layer (the tiny encoder's 16x16 map cannot pass five; 4x4 P maps); A_F at 64
# channels with 16 noise channels. T = 50 keeps the paper's 200 / 256 = 0.78 nats per latent channel for the 64
# latent channels of ngf 16. Budgets: TD 1 + 0.5 epochs, Steps I-III 1, 0.5, 0.5 epochs per round (the paper's
# 10 + 5 and 7.5 : 3.75 : 3.75 scaled by 1/10 and 2/15), 3 rounds: 1,050 steps, which lets the default sweep (two
# trials, two at a time on two cores) finish in 10 minutes.
SYNTHETIC = {
    "architecture": "tiny",
    "freeze_batchnorm": False,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "generator_filters": 16,
    "generator_blocks": 6,
    "patch_discriminator_filters": 16,
    "feature_discriminator_downsampling": 1,
    "augmentor_channels": 64,
    "augmentor_noise_channels": 16,
    "T": 50.0,
    "td_epochs_constant": 1.0,
    "td_epochs_decay": 0.5,
    "tf_segment_epochs": 1.0,
    "tf_augment_epochs": 0.5,
    "tf_align_epochs": 0.5,
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
