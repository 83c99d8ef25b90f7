"""Wiring errors, one line each, applied to a copy of the repository: does the method's test file catch each one?

    python benchmarks/wiring_mutations.py [ID ...] [--json results.json]

Issue 19's probe of the train-step tests: each entry below changes one line of a method (an adversarial label
flipped, a discriminator's real/fake labels swapped, two loss weights swapped, a sign flipped, a term dropped, a
detach removed or added, a schedule or Adam beta changed, a frozen module trained, inference bypassing a
component) in a copy made with `git archive HEAD`, runs that method's test file (`-x`, stopping at the first failure,
VGG-16 paper-size tests left out for time) and prints which test failed. A wiring error no test catches prints
NOT CAUGHT and makes the exit status 1. Each pattern must occur exactly once in the file it changes (otherwise the
entry reports an error: the code moved and the entry needs updating).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSCL, SEUDA, SO, ASN = "methods/cscl.py", "methods/seuda.py", "methods/source_only.py", "methods/adaptsegnet.py"
TESTS = {
    CSCL: "tests/methods/test_cscl.py",
    SEUDA: "tests/methods/test_seuda.py",
    SO: "tests/methods/test_source_only.py",
    ASN: "tests/methods/test_adaptsegnet.py",
}

# (id, wiring error, file, the line as it is, the line with the error)
MUTATIONS = [
    # ---- CSCL
    (
        "C1",
        "adversarial label flipped (E's L_adv target)",
        CSCL,
        "loss_adv = domain_bce(discriminate(hp, modules, features_t), 1.0)",
        "loss_adv = domain_bce(discriminate(hp, modules, features_t), 0.0)",
    ),
    (
        "C2",
        "D's real/fake labels swapped",
        CSCL,
        "loss_d = 0.5 * (domain_bce(d_s, 1.0) + domain_bce(d_t, 0.0))",
        "loss_d = 0.5 * (domain_bce(d_s, 0.0) + domain_bce(d_t, 1.0))",
    ),
    (
        "C3",
        "two loss weights swapped (xi2 <-> xi3)",
        CSCL,
        "    loss_encoder = hp.xi2 * loss_adv\n",
        "    loss_encoder = hp.xi3 * loss_adv\n",
    ),
    (
        "C4",
        "two loss weights swapped (xi3 -> xi2 on L_div)",
        CSCL,
        "loss_encoder = loss_encoder + hp.xi3 * loss_div",
        "loss_encoder = loss_encoder + hp.xi2 * loss_div",
    ),
    (
        "C5",
        "sign of a loss term flipped (L_cri)",
        CSCL,
        '_descend(ctx, "quantizer", loss_seg + hp.xi1 * loss_cri)',
        '_descend(ctx, "quantizer", loss_seg - hp.xi1 * loss_cri)',
    ),
    (
        "C6",
        "sign of a loss term flipped (L_div)",
        CSCL,
        "loss_encoder = loss_encoder + hp.xi3 * loss_div",
        "loss_encoder = loss_encoder - hp.xi3 * loss_div",
    ),
    (
        "C7",
        "a target term dropped from an update (T_Q's L_seg without Eq. 7's target term)",
        CSCL,
        "    ) + target_segmentation_loss(\n        step.labels_t,\n        _probabilities(segment(hp, modules, features_t, p_t), step.size_t),",
        "    ) + 0 * target_segmentation_loss(\n        step.labels_t,\n        _probabilities(segment(hp, modules, features_t, p_t), step.size_t),",
    ),
    (
        "C8",
        "a target term dropped from an update (T_C's L_reg without the target)",
        CSCL,
        "        + reward_regression_loss(value_t, reward_t, step.labels_t.sum(1) > 0)",
        "        + 0 * reward_regression_loss(value_t, reward_t, step.labels_t.sum(1) > 0)",
    ),
    (
        "C9",
        "the configured gamma ignored (pseudo labels)",
        CSCL,
        'return soft_pseudo_labels(probabilities, state["thresholds"].to(probabilities.device), hp.gamma)',
        'return soft_pseudo_labels(probabilities, state["thresholds"].to(probabilities.device), 0.25)',
    ),
    (
        "C10",
        "the configured gamma ignored (Eq. 7's target term)",
        CSCL,
        "        step.delta,\n        hp.gamma,\n        hp.eq7_reduction,\n    )",
        "        step.delta,\n        0.25,\n        hp.eq7_reduction,\n    )",
    ),
    (
        "C11",
        "hard labels from argmin (w/oCG)",
        CSCL,
        "return F.one_hot(probabilities.argmax(1), probabilities.shape[1])",
        "return F.one_hot(probabilities.argmin(1), probabilities.shape[1])",
    ),
    (
        "C12",
        "moving-average weights swapped (centroid EMA)",
        CSCL,
        "hp.centroid_momentum * history + (1 - hp.centroid_momentum) * batch",
        "(1 - hp.centroid_momentum) * history + hp.centroid_momentum * batch",
    ),
    (
        "C13",
        "inference ignoring the transferability map",
        CSCL,
        "    return upsample(_logits(hp, modules, imagenet_normalise(images)), tuple(images.shape[-2:]))",
        "    return upsample(modules['segmenter'](imagenet_normalise(images)), tuple(images.shape[-2:]))",
    ),
    (
        "C14",
        "a detach removed (P not detached in line 4)",
        CSCL,
        '    features = modules["segmenter"].encode(step.x_s)\n    p = transferability_map(hp, modules, features.main).detach() if hp.critical_transfer else None',
        '    features = modules["segmenter"].encode(step.x_s)\n    p = transferability_map(hp, modules, features.main) if hp.critical_transfer else None',
    ),
    (
        "C15",
        "the critic loss detached from T_Q (L_cri on a detached P)",
        CSCL,
        "loss_cri = 0.5 * (critic_loss(critic(features_s.main, p_s)) + critic_loss(critic(features_t.main, p_t)))",
        "loss_cri = 0.5 * (critic_loss(critic(features_s.main, p_s.detach())) + critic_loss(critic(features_t.main, p_t.detach())))",
    ),
    (
        "C16",
        "R^a compares C with P against itself (C^b dropped)",
        CSCL,
        "            _probabilities(segment(hp, modules, features_t, None), step.size_t),",
        "            _probabilities(segment(hp, modules, features_t, p_t), step.size_t),",
    ),
    (
        "C17",
        "no learning-rate decay (Adam schedules)",
        CSCL,
        'return poly_schedule(adam, num_steps, hp.poly_power) if hp.adam_schedule == "poly" else None',
        "return None",
    ),
    (
        "C18",
        "a wrong Adam beta (D, T_Q, T_C)",
        CSCL,
        "adam = _adam(modules[name].parameters(), learning_rate, (0.9, 0.99))",
        "adam = _adam(modules[name].parameters(), learning_rate, (0.9, 0.999))",
    ),
    (
        "C19",
        "S_A grown with target epochs instead of source epochs",
        CSCL,
        "portion = selection_amount(ctx.source_epoch,",
        "portion = selection_amount(ctx.target_epoch,",
    ),
    (
        "C20",
        "pseudo labels of line 5 without P",
        CSCL,
        '    features = modules["segmenter"].encode(step.x_t)\n    p = transferability_map(hp, modules, features.main) if hp.critical_transfer else None\n    logits = segment(hp, modules, features, p)\n    step.labels_t',
        '    features = modules["segmenter"].encode(step.x_t)\n    p = None\n    logits = segment(hp, modules, features, p)\n    step.labels_t',
    ),
    # ---- SeUDA
    (
        "S1",
        "SeUDA's discriminators swapped (generator terms)",
        SEUDA,
        '    gan_t2s = generator_gan_loss(modules["discriminator_s"](fake_s))\n    gan_s2t = generator_gan_loss(modules["discriminator_t"](fake_t))',
        '    gan_t2s = generator_gan_loss(modules["discriminator_t"](fake_s))\n    gan_s2t = generator_gan_loss(modules["discriminator_s"](fake_t))',
    ),
    (
        "S2",
        "SeUDA's discriminators swapped (D updates)",
        SEUDA,
        'pairs = [("discriminator_s", x_s, fake_s, "pool_s"), ("discriminator_t", x_t, fake_t, "pool_t")]',
        'pairs = [("discriminator_t", x_s, fake_s, "pool_s"), ("discriminator_s", x_t, fake_t, "pool_t")]',
    ),
    (
        "S3",
        "the wrong generator in the cycle",
        SEUDA,
        'cyc = cycle_loss(modules["generator_s2t"](fake_s), x_t, modules["generator_t2s"](fake_t), x_s)',
        'cyc = cycle_loss(modules["generator_t2s"](fake_s), x_t, modules["generator_t2s"](fake_t), x_s)',
    ),
    (
        "S4",
        "the semantic loss detached",
        SEUDA,
        "predicted_masks = F.softmax(segment(modules, from_gan(fake_s)), dim=1)",
        "predicted_masks = F.softmax(segment(modules, from_gan(fake_s.detach())), dim=1)",
    ),
    (
        "S5",
        "two loss weights swapped (alpha <-> lambda)",
        SEUDA,
        "    total = gan_s2t + hp.alpha * gan_t2s + hp.beta * cyc\n    return total + hp.lambda_sem * sem if sem is not None else total",
        "    total = gan_s2t + hp.lambda_sem * gan_t2s + hp.beta * cyc\n    return total + hp.alpha * sem if sem is not None else total",
    ),
    (
        "S6",
        "a discriminator's real/fake labels swapped",
        SEUDA,
        "loss_d = discriminator_loss(modules[name](real), modules[name](pooled))",
        "loss_d = discriminator_loss(modules[name](pooled), modules[name](real))",
    ),
    (
        "S7",
        "adversarial label flipped (generator wants 'fake')",
        SEUDA,
        '    """A generator\'s least-squares GAN term: (D(G(x)) − 1)²."""\n    return lsgan_loss(d_fake, True)',
        '    """A generator\'s least-squares GAN term: (D(G(x)) − 1)²."""\n    return lsgan_loss(d_fake, False)',
    ),
    (
        "S8",
        "the image pool bypassed",
        SEUDA,
        "pooled = pool.query(fake.detach(), ctx.generator)",
        "pooled = fake.detach()",
    ),
    (
        "S9",
        "no learning-rate decay",
        SEUDA,
        "out[name] = Optim(adam, linear_decay(adam, constant, num_steps - constant))",
        "out[name] = Optim(adam, None)",
    ),
    ("S10", "a wrong Adam beta", SEUDA, "betas=(hp.gan_beta1, hp.gan_beta2)", "betas=(0.9, hp.gan_beta2)"),
    (
        "S11",
        "sign of a loss term flipped (cycle)",
        SEUDA,
        "total = gan_s2t + hp.alpha * gan_t2s + hp.beta * cyc",
        "total = gan_s2t + hp.alpha * gan_t2s - hp.beta * cyc",
    ),
    (
        "S12",
        "a term dropped (the source cycle)",
        SEUDA,
        "return (reconstructed_t - x_t).abs().mean() + (reconstructed_s - x_s).abs().mean()",
        "return (reconstructed_t - x_t).abs().mean()",
    ),
    (
        "S13",
        "D_t learns from source images as real",
        SEUDA,
        '("discriminator_t", x_t, fake_t, "pool_t")',
        '("discriminator_t", x_s, fake_t, "pool_t")',
    ),
    (
        "S14",
        "inference not through the translator",
        SEUDA,
        '    elif hp.adaptation == "seuda" and stage.name == "translate":\n        images = translate(modules, images)',
        '    elif hp.adaptation == "seuda" and stage.name == "nothing":\n        images = translate(modules, images)',
    ),
    (
        "S15",
        "post-processing only in the GAN stage (before issue 19)",
        SEUDA,
        "    if not hp.postprocess:\n        return logits",
        '    if not (hp.postprocess and stage.name == "translate"):\n        return logits',
    ),
    (
        "S16",
        "the segmenter updated in the GAN stage (frozen module moves)",
        SEUDA,
        'trains = GENERATORS + ("discriminator_s", "discriminator_t")',
        'trains = GENERATORS + ("segmenter", "discriminator_s", "discriminator_t")',
    ),
    # ---- source_only, adaptsegnet (beyond the 28)
    (
        "O1",
        "source_only: target images in the step (uses_target)",
        SO,
        "            uses_target=False,",
        "            uses_target=True,",
    ),
    (
        "O2",
        "source_only: no learning-rate decay",
        "methods/shared/recipes.py",
        "return Optim(sgd, poly_schedule(sgd, num_steps, hp.poly_power))",
        "return Optim(sgd, None)",
    ),
    (
        "A1",
        "adaptsegnet: adversarial label flipped",
        ASN,
        "return domain_bce(d_target, SOURCE_LABEL)",
        "return domain_bce(d_target, TARGET_LABEL)",
    ),
    (
        "A2",
        "adaptsegnet: D's labels swapped",
        ASN,
        "return 0.5 * (domain_bce(d_source, SOURCE_LABEL) + domain_bce(d_target, TARGET_LABEL))",
        "return 0.5 * (domain_bce(d_source, TARGET_LABEL) + domain_bce(d_target, SOURCE_LABEL))",
    ),
    (
        "A3",
        "adaptsegnet: lambda_adv ignored",
        ASN,
        "ctx.backward(loss_seg + ctx.hp.lambda_adv * loss_adv)",
        "ctx.backward(loss_seg + 0.001 * loss_adv)",
    ),
    (
        "A4",
        "adaptsegnet: a wrong Adam beta",
        ASN,
        "betas=(hp.discriminator_beta1, hp.discriminator_beta2),",
        "betas=(hp.discriminator_beta1, 0.999),",
    ),
    (
        "A5",
        "adaptsegnet: softmax maps not upsampled (D sees the logits' resolution)",
        ASN,
        "return F.softmax(upsample(logits, size), dim=1)",
        "return F.softmax(logits, dim=1)",
    ),
]


def probe(copy: str, entry: tuple[str, str, str, str, str], data_root: str) -> dict:
    mid, category, path, old, new = entry
    target = os.path.join(copy, path)
    text = open(target).read()
    if text.count(old) != 1:
        return {"category": category, "error": f"pattern found {text.count(old)} times in {path}"}
    open(target, "w").write(text.replace(old, new))
    try:
        test = TESTS.get(path, TESTS[SO])
        command = [sys.executable, "-m", "pytest", test, "-q", "-x", "-k", "not vgg16", "-p", "no:cacheprovider"]
        out = subprocess.run(
            [*command, "-rf", "--timeout", "900"],
            cwd=copy,
            capture_output=True,
            text=True,
            env=dict(os.environ, UDA_TEST_DATA_ROOT=data_root),
        )
    finally:
        open(target, "w").write(text)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", out.stdout, re.M)))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return {"category": category, "failed": failed, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="entries to run (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results, missed = {}, 0
    with tempfile.TemporaryDirectory(prefix="uda-mutations-") as work:
        copy, data_root = os.path.join(work, "repo"), os.path.join(work, "data")
        os.makedirs(copy)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", copy], input=archive, check=True)
        print("| id | wiring error (one line changed) | first test that fails |")
        print("|---|---|---|")
        for entry in MUTATIONS:
            if args.ids and entry[0] not in args.ids:
                continue
            result = results[entry[0]] = probe(copy, entry, data_root)
            caught = result.get("failed")
            missed += not caught
            verdict = f"`{caught[0].split('::')[-1]}`" if caught else result.get("error", "NOT CAUGHT")
            print(f"| {entry[0]} | {entry[1]} | {verdict} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    print(f"\n{len(results) - missed} of {len(results)} wiring errors caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
