"""Does pretraining help? k-shot accuracy on the fixed digits test split for three feature sets.

    python scripts/proof_of_learning.py RUN_DIR [--shots 1 2 5 10] [--splits 5]

(a) the MSN target encoder of RUN_DIR, (b) the same architecture at random init, (c) the raw 8x8
pixels; all with msn-eval's low-shot protocol (centred + L2-normalised features, L2 logistic
regression with the penalty cross-validated on the shots). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from sklearn.datasets import load_digits

from msn.backbone import MaskedViT
from msn.features import extract_features, load_encoder
from msn.protocols import logistic_regression, sample_per_class
from msn.splits import digits_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args()

    train, test = digits_splits()
    trained = load_encoder(args.run_dir)
    torch.manual_seed(0)
    b = trained.backbone
    random_vit = MaskedViT(b.spec, b.patch_embed.patch_size[0], trained.image_size).eval()
    random = replace(trained, backbone=random_vit, fingerprint="random-init")
    pixels = load_digits().data.astype(np.float32)  # (1797, 64) raw 8x8 pixels
    train_idx = np.array([int(n) for n in train.names])
    test_idx = np.array([int(n) for n in test.names])
    features = {
        "MSN target encoder": [extract_features(trained, s, None).numpy() for s in (train, test)],
        "same ViT, random init": [extract_features(random, s, None).numpy() for s in (train, test)],
        "raw 8x8 pixels": [pixels[train_idx], pixels[test_idx]],
    }
    print("| features | " + " | ".join(f"{k}-shot" for k in args.shots) + " |")
    print("|---|" + "---|" * len(args.shots))
    for name, (x_train, x_test) in features.items():
        cells = []
        for k in args.shots:
            accs = [logistic_regression(x_train[idx], train.labels[idx], x_test, test.labels, None)
                    for idx in (sample_per_class(train.labels, k, seed) for seed in range(args.splits))]
            cells.append(f"{np.mean(accs):.1f} +- {np.std(accs):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
