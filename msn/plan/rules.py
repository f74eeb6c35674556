"""The rules that fit MSN's recipe to a data set and a machine, one function per decision, each value with its reason.

The paper's recipe is made for ImageNet (photos of about 400 px, 1.28 M of them) on 32 GPUs: 224-px global views
and 96-px focal views of ViT-S/16 (14 x 14 tokens), 1024 prototypes, a global batch of 1024 at lr 1e-3, hundreds of
epochs. A user's own set is often far smaller, and their machine one GPU or a CPU. Each rule below keeps the
paper's choice where the data and machine match it and says what it changes where they do not; the presets
that were tuned by hand (digits, Fashion-MNIST: docs/studies.md) are the evidence for the small-image rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from msn.plan.measure import ImageStats, Machine

PAPER_GLOBAL, PAPER_FOCAL = 224, 96  # the paper's view sizes: a focal view is 3/7 of a global one
PAPER_LR, PAPER_START_LR, PAPER_BATCH = 1e-3, 2e-4, 1024  # lr and warm-up start for a global batch of 1024
CPU_MAX_VIEW = 96  # a CPU trains ViT-pico on 96-px views (6 x 6 tokens) at ~25 images/s on 2 cores; 224 px: ~1
MAX_LR_SCALE = 4.0  # linear scaling stops at 4x the paper's lr (a global batch of 4,096)
CPU_STEPS, GPU_STEPS = 5_000, 20_000  # the fewest steps a run of a small set is given, without a budget
TINY, SMALL, MEDIUM = 16, 64, 160  # images' short sides below which the crops are milder


@dataclass(frozen=True)
class Choice:
    """One fitted value: the config key it sets, the value and the reason the plan prints."""

    key: str
    value: Any
    reason: str


def _pow2_at_most(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def global_view_size(stats: ImageStats, machine: Machine) -> Choice:
    """The global views' side: the images' median short side rounded to 16 px (at least 32), at most the paper's
    224 px on a GPU and 96 px on a CPU, where a 224-px view of even the smallest ViT takes about a second an image.
    A view larger than the image only upsamples it: more tokens, no more detail."""
    size = max(32, 16 * round(stats.short_side / 16))
    cap = PAPER_GLOBAL if machine.on_gpu else CPU_MAX_VIEW
    reason = f"the median image is {stats.median_width} x {stats.median_height} px"
    if size > cap:
        size = cap
        reason += (f"; the paper's {cap} px" if machine.on_gpu else
                   f"; at most {cap} px on a CPU (a 224-px view trains at about an image a second there)")
    return Choice("data.global_size", size, reason)


def patch_size(global_size: int, machine: Machine) -> Choice:
    """The patch: a global view of 14 x 14 tokens at 224 px on a GPU (the paper's ViT-S/16), 8 x 8 to 12 x 12 on
    smaller views; on a CPU 4 x 4 to 6 x 6 tokens (the digits and Fashion-MNIST presets: 16 tokens train well and
    cost a quarter of 64)."""
    if machine.on_gpu:
        patch = 4 if global_size <= 48 else 8 if global_size <= 112 else 16
    else:
        patch = 8 if global_size <= 48 else 16
    grid = global_size // patch
    where = "on a GPU" if machine.on_gpu else "on a CPU"
    return Choice("model.patch_size", patch, f"{grid} x {grid} tokens a global view {where}")


def focal_view_size(global_size: int, patch: int) -> Choice:
    """The focal views: the paper's 96/224 of a global view, in whole patches (at least 2 x 2)."""
    ratio = round(global_size * PAPER_FOCAL / PAPER_GLOBAL / patch)
    patches = max(2, ratio)
    why = "the paper's 96/224 of the global view" if patches == ratio else "at least 2 x 2 patches"
    return Choice("data.focal_size", patches * patch, f"{why}, {patches} x {patches} patches")


def global_view_for_patch(stats: ImageStats, machine: Machine, patch: int) -> Choice:
    """The global views' side when the user gave the patch: the images' median short side in whole patches (at least
    4 x 4 of them), at most the device's cap (:func:`global_view_size`)."""
    cap = PAPER_GLOBAL if machine.on_gpu else CPU_MAX_VIEW
    n = max(1, round(min(max(stats.short_side, 4 * patch), cap) / patch))
    size = patch * (n if patch * n <= cap else max(1, cap // patch))
    return Choice("data.global_size", size, f"the median image is {stats.median_width} x {stats.median_height} px, "
                  f"in whole patches of model.patch_size={patch}")


def _colour(stats: ImageStats) -> bool:
    return stats.colour_share >= 0.5  # most of the sample is stored in colour and shows it


def crop_scales(stats: ImageStats) -> list[Choice]:
    """Crop areas and blur by the images' size, in the hand-made presets' tiers. With the paper's scales (global
    0.3-1, focal 0.05-0.3) and blur, the digits preset's tiny model could not predict a view's target on 8-px
    digits and the loss stayed at log K; the milder scales it found (0.6-1, 0.3-0.7, no blur) trained. On 28-px
    Fashion-MNIST the Fashion-MNIST preset found wider crops (0.25-1, 0.1-0.4) slightly ahead, and no blur. Colour
    images under 160 px get the digits preset's crops too: their stronger colour distortion
    (:func:`colour_distortion`) already makes two views hard to match, and on the 64-px colour sets of
    docs/studies.md the milder crops were ahead by 3 points of k-NN in 800 steps and by 3.9 at a 12-minute budget
    (measured at 64 px only; smaller colour images get them by the same reasoning)."""
    s = stats.short_side
    blur_why = "no blur: it erases a small image's detail (the digits and Fashion-MNIST presets)"
    if s < TINY:
        scales, why, blur = ([0.6, 1.0], [0.3, 0.7]), f"images of {s} px have little to spare (the digits preset)", 0.0
    elif s < MEDIUM and _colour(stats):
        why = f"colour images of {s} px: milder crops beside the stronger colour distortion (the digits preset's)"
        scales, blur, blur_why = ([0.6, 1.0], [0.3, 0.7]), 0.0, "no blur beside the stronger colour distortion"
    elif s < SMALL:
        scales, why, blur = ([0.25, 1.0], [0.1, 0.4]), f"images of {s} px: the Fashion-MNIST preset's (28 px)", 0.0
    elif s < MEDIUM:
        why = f"images of {s} px: between the small-image presets and the paper"
        scales, blur, blur_why = ([0.4, 1.0], [0.15, 0.4]), 0.5, "the paper's blur"
    else:
        why = f"images of {s} px: the paper's ImageNet scales"
        scales, blur, blur_why = ([0.3, 1.0], [0.05, 0.3]), 0.5, "the paper's blur"
    return [Choice("data.global_scale", scales[0], why), Choice("data.focal_scale", scales[1], why),
            Choice("data.blur_p", blur, blur_why)]


def colour_distortion(stats: ImageStats) -> list[Choice]:
    """Colour jitter's strength and the grayscale probability. Two views of one image share its colours; where
    colours vary from image to image but carry no class, matching them predicts a view's target without looking at
    the shapes, and the paper's distortion (strength 0.5: hue moved by at most 0.1; grayscale 0.2) leaves them
    recognisable. Small colour images (under 160 px) get SimCLR's strength 1.0 and grayscale 0.5: on the 64-px
    colour sets of docs/studies.md the paper's distortion learnt the colours and ended under random
    initialisation (k-NN 24.5 % against 30.6 on clothes_contrast), SimCLR's reached 38.0 % in the same 800 steps
    (grayscale 0.2 with strength 1.0: 28.5 %). Grey images and photos of the paper's size keep the paper's; grey
    images are jittered half the time (the paper: 80 %), as the grey presets were (on Fashion-MNIST as a folder, with
    its own normalisation and the preset's schedule, +1.8 points at 5 shots in 2,000 steps: docs/studies.md)."""
    if _colour(stats) and stats.short_side < MEDIUM:
        why = f"colour images of {stats.short_side} px: colour must not tell the views apart (SimCLR's)"
        return [Choice("data.color_jitter", 1.0, why), Choice("data.grayscale_p", 0.5, why),
                Choice("data.color_jitter_p", 0.8, "the paper's")]
    if _colour(stats):
        return [Choice(key, value, "the paper's") for key, value in
                (("data.color_jitter", 0.5), ("data.grayscale_p", 0.2), ("data.color_jitter_p", 0.8))]
    why = "the paper's (grey images)"
    return [Choice("data.color_jitter", 0.5, why), Choice("data.grayscale_p", 0.2, why),
            Choice("data.color_jitter_p", 0.5, "grey images: the digits and Fashion-MNIST presets' (brightness and "
                   "contrast are all the jitter changes)")]


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def normalisation(stats: ImageStats) -> list[Choice]:
    """The mean and std that views are normalised with: for grey images the sample's own, ImageNet's (the paper's)
    for colour images. Grey garments and digits are far from ImageNet (Fashion-MNIST: mean 0.286 and std 0.353,
    against 0.485 and 0.229 in red), and with ImageNet's figures the fitted recipe on Fashion-MNIST as a folder ended
    1.8 points of k-NN and 3.7 at 5 shots behind the same recipe with its own (2,000 steps), as the hand-made grey
    presets always normalised with their set's; on digits the two were level. On the 64-px colour clothes the
    sample's own left a 4-minute run at log K until the collapse watch stopped it, where ImageNet's learnt
    (docs/studies.md), so colour images keep the paper's. A plan recorded before the pixels were measured keeps
    ImageNet's too."""
    if stats.mean is None or stats.std is None or _colour(stats):
        why = "ImageNet's (the paper's)" + (", for colour images" if _colour(stats) else "")
        return [Choice("data.mean", IMAGENET_MEAN, why), Choice("data.std", IMAGENET_STD, why)]
    why = f"grey images: the {stats.sampled} sampled images' pixels (ImageNet's are a colour photo's)"
    return [Choice("data.mean", list(stats.mean), why), Choice("data.std", list(stats.std), why)]


def focal_views(machine: Machine) -> Choice:
    """The paper's 10 focal views on a GPU. On a CPU 2, as the Fashion-MNIST preset: each focal view costs a CPU its
    share of the step (2 instead of 6 made its step 1.8x cheaper), and at equal steps the accuracy was the same, so
    a time budget buys more steps (docs/studies.md)."""
    if machine.on_gpu:
        return Choice("data.num_focal", 10, "the paper's")
    return Choice("data.num_focal", 2, "on a CPU each focal view costs time (the Fashion-MNIST preset's 2)")


def mask_ratio(machine: Machine) -> Choice:
    """The share of the anchor's patches dropped: the paper's 0.15 for ViT-S/16 on a GPU; on a CPU 0.3, as the
    Fashion-MNIST preset (its 4 x 4 tokens: the same accuracy at equal steps as 0.15, the step 11 % cheaper)."""
    if machine.on_gpu:
        return Choice("masking.ratio", 0.15, "the paper's for ViT-S/16")
    return Choice("masking.ratio", 0.3, "on a CPU fewer anchor patches make a cheaper step (the Fashion-MNIST "
                  "preset's 0.3)")


MODEL_HEADS = {"vit_pico": (512, 128), "vit_tiny": (2048, 256), "vit_small": (2048, 256)}  # head hidden, output


def model_size(stats: ImageStats, machine: Machine) -> list[Choice]:
    """ViT-pico on a CPU (the only size that trains in minutes there); on a GPU ViT-Ti for fewer than 20,000
    images (a ViT-S has more weights than such a set has images to constrain them) and the paper's ViT-S above."""
    if not machine.on_gpu:
        arch, reason = "vit_pico", "on a CPU: 128 wide, 4 deep (ViT-S: 20x the compute)"
    elif stats.count < 20_000:
        arch, reason = "vit_tiny", f"{stats.count:,} images (under 20,000): ViT-Ti, a quarter of ViT-S"
    else:
        arch, reason = "vit_small", f"{stats.count:,} images: the paper's ViT-S"
    hidden, output = MODEL_HEADS[arch]
    return [Choice("model.arch", arch, reason),
            Choice("model.head_hidden_dim", hidden, f"{arch}'s projection head"),
            Choice("model.head_output_dim", output, f"{arch}'s projection head")]


def prototypes(count: int, global_batch: int) -> Choice:
    """The paper's 1024 prototypes for ImageNet's 1.28 M images and global batch of 1024; fewer for fewer images
    (one per 30 images at most) and for smaller batches (twice the global batch at most: ME-MAX spreads one
    batch's predictions over them), a power of 2 from 64 (the digits preset) up."""
    bound = min(count / 30, 2 * global_batch)
    k = min(1024, max(64, _pow2_at_most(bound)))
    return Choice("model.num_prototypes", k, f"{count:,} images and a global batch of {global_batch}")


def batch_size(count: int, machine: Machine, largest: Callable[[int], int] | None = None) -> Choice:
    """Images per process: 64 on a CPU (the Fashion-MNIST preset: more steps of 64 beat fewer of 128); on a GPU the
    largest power of 2 up to 256 whose step fits in its memory (``largest(cap)``, measured as msn-bench step
    --max-batch does; 0 when not even 2 images fit). At most an eighth of the images an epoch takes (``count``) per
    step, so an epoch has steps to shuffle."""
    cap = _pow2_at_most(count / (8 * machine.world))
    if machine.on_gpu and largest is not None and cap >= 2:  # below 2 there is nothing to search: the floor is 2
        fits = largest(min(256, cap))
        if fits < 2:
            raise ValueError(f"not even a batch of 2 images fits the memory of {machine.gpu or 'this GPU'}; give a "
                             "smaller model (model.arch) or smaller views (data.global_size)")
        batch = min(fits, cap, 256)
        reason = ("the largest batch whose step fits the GPU's memory" if fits < min(256, cap) else
                  "its step fits the GPU's memory" if batch < 256 else
                  "the most the rules try, and its step fits the GPU's memory")
    elif machine.on_gpu:
        batch, reason = min(128, cap), "a GPU's default (its memory was not measured)"
    else:
        batch, reason = min(64, cap), "a CPU's (the Fashion-MNIST preset)"
    if batch == cap and batch < (256 if machine.on_gpu else 64):
        share = f"an eighth of {count:,} images" + (f" over {machine.world} processes" if machine.world > 1 else "")
        reason = share if "fits" not in reason else f"{share} ({reason})"
    if batch < 2:
        batch, reason = 2, f"the head's BatchNorm needs 2 images a step ({count:,} images)"
    return Choice("data.batch_size", batch, reason)


def learning_rate(global_batch: int, base_size: int = PAPER_BATCH) -> list[Choice]:
    """lr and the warm-up's start: the paper's 1e-3 and 2e-4 at its global batch of 1024, scaled linearly for larger
    global batches. Smaller batches keep them: scaled down linearly they learn far less in a short run (digits,
    batch 64, 3 minutes on 2 cores: k-NN 47.2 % at the linear 6.25e-5, 57.2 % at the square-root rule's 2.5e-4,
    75.4 % at 1e-3; docs/studies.md), as the hand-made presets found (1e-3 at 64 and 128)."""
    scale = min(MAX_LR_SCALE, max(1.0, global_batch / base_size))
    if scale == MAX_LR_SCALE and global_batch / base_size > MAX_LR_SCALE:
        why = (f"the paper's {{}} x {MAX_LR_SCALE:g}: linear scaling with the global batch ({global_batch}), held at "
               f"{MAX_LR_SCALE:g}x (AdamW diverges past it)")
    elif scale > 1:
        why = f"the paper's {{}} x {global_batch}/{base_size} (linear scaling with the global batch)"
    else:
        why = (f"the paper's {{}}, kept for a global batch of {global_batch} (scaled down linearly, a short run "
               "learns far less: docs/studies.md)")
    return [Choice("optim.lr", PAPER_LR * scale, why.format("1e-3")),
            Choice("optim.start_lr", PAPER_START_LR * scale, why.format("2e-4"))]


def epochs(count: int, global_batch: int, machine: Machine) -> Choice:
    """The run's length from the data set's size (``count``: the images an epoch takes): 100 epochs (most of the
    paper's accuracy at a fraction of its 300-600) when that makes enough steps, else as many epochs as make 20,000
    steps on a GPU, 5,000 on a CPU."""
    per_epoch = max(1, count // global_batch)
    least = GPU_STEPS if machine.on_gpu else CPU_STEPS
    if machine.on_gpu and per_epoch * 100 >= least:
        return Choice("optim.epochs", 100, f"{_steps(per_epoch)} an epoch: 100 epochs")
    n = max(1, math.ceil(least / per_epoch))
    if machine.on_gpu:
        n = max(n, 100)
    return Choice("optim.epochs", n, f"{_steps(per_epoch)} an epoch: {n * per_epoch:,} steps (at least {least:,} "
                  f"on a {'GPU' if machine.on_gpu else 'CPU'}; optim.budget=30m fits the run to a time instead)")


def warmup(total_steps: int, steps_per_epoch: int) -> Choice:
    """The lr warm-up: 5 % of the run (the paper's 15 of 300 epochs), at least one step."""
    steps, per_epoch = max(1, round(0.05 * total_steps)), max(1, steps_per_epoch)
    epochs = steps / per_epoch
    while int(epochs * per_epoch) < steps:  # the run truncates (msn.train.builder.warmup_steps): 1/49 x 49 is 0.99..
        epochs = math.nextafter(epochs, math.inf)
    return Choice("optim.warmup_epochs", epochs, f"5 % of the run: {_steps(steps)}")


def ema_momentum(total_steps: int) -> list[Choice]:
    """The target's EMA momentum, from m at the start to m_final at the end (the paper: 0.996 -> 1.0 over ~375,000
    steps). The target averages the last ~1/(1-m) steps: 2 % of the run at the start, between 0.99 (the digits
    preset's: 0.996 lagged half its 560 steps) and the paper's 0.996; 4 % at the end, so that the target keeps
    following the encoder (the Fashion-MNIST preset's 0.995 after 7,500 steps, where 1.0 froze it), and the
    paper's 1.0 only in the limit of a paper-length run."""
    n = max(total_steps, 1)
    m = min(0.996, max(0.99, 1 - 1 / (0.02 * n)))
    final = min(1.0, max(m, 1 - 1 / (0.04 * n)))
    window, end_window = 1 / (1 - m), 1 / (1 - final)  # the steps the target averages, at the start and the end
    start_why = f"the target averages ~{window:,.0f} steps, {_share_of_run(window, n)}"
    if round(window) > round(0.02 * n):  # the floor: 2 % of a run this short would be a few steps
        start_why += " (0.99 at least, the digits preset's)"
    elif round(window) < round(0.02 * n):
        start_why += " (the paper's 0.996 at most)"
    return [Choice("optim.ema_momentum", round(m, 5), start_why),
            Choice("optim.final_ema_momentum", round(final, 8), f"at the end ~{end_window:,.0f} steps, "
                   f"{_share_of_run(end_window, n)} (1.0 would freeze the target)")]


def _share_of_run(window: float, total_steps: int) -> str:
    """How a window of steps compares with the run: "4.0 % of the run's 5,000", or "more than the run's 3 steps"."""
    if window > total_steps:
        return f"more than the run's {_steps(total_steps)}"
    return f"{100 * window / total_steps:.1f} % of the run's {total_steps:,}"


def loader_workers(machine: Machine) -> Choice:
    """Loader workers: on a GPU every core but the trainer's (at most 16: a ViT-S step at 1,500 images/s needs
    about 13 cores of decoding and augmentation); on a CPU a quarter of the cores (at least one: the Fashion-MNIST
    preset's worker makes the next views while the step runs; the step needs the rest)."""
    cores = f"{machine.cores} core{'s' if machine.cores > 1 else ''}"
    if machine.on_gpu:
        n = max(1, min(16, machine.cores - 1))
        why = ("one worker beside the trainer" if machine.cores == 1 else
               "all but the trainer's" if machine.cores <= 17 else "16 at most (a ViT-S step needs about 13)")
        return Choice("data.num_workers", n, f"{cores} for this process: {why}")
    n = max(1, machine.cores // 4)
    why = "one worker, sharing it with the step" if machine.cores == 1 else "the step uses the others"
    return Choice("data.num_workers", n, f"{cores}: {why}")


def _steps(n: int) -> str:
    return f"{n:,} step{'s' if n != 1 else ''}"
