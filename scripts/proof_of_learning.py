"""Does pretraining help? Low-shot and k-NN accuracy on a fixed test split for three feature sets.

    python scripts/proof_of_learning.py RUN_DIR [--dataset digits|fashion_mnist|DIR] [--shots 1 5 10] [--splits 5]
                                        [--crop-pct 1] [--json FILE]

(a) the MSN target encoder of RUN_DIR (a run folder, checkpoint or hf export), (b) the same
architecture at random init, (c) the raw pixels (8x8 for digits, 28x28 for Fashion-MNIST, a labelled folder's
at its images' own size, which must then agree); all with
msn-eval's protocols: low-shot = centred + L2-normalised features, L2 logistic regression with the
penalty cross-validated on the shots, mean +- std over --splits draws of the shots; k-NN = cosine,
k=20, temperature-weighted votes, with every training label. Test split: digits' fixed 540 images,
Fashion-MNIST's official 10,000, a folder's val/. The ViTs see the centre --crop-pct of each image (msn-eval's default
0.875, the paper's 256 -> 224; 1: the whole image, as the raw pixels are). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from msn.config import DEFAULT_CROP_PCT, check_crop_pct
from msn.eval.features import extract_features, load_encoder
from msn.eval.protocols.knn import knn_accuracy
from msn.eval.protocols.lowshot import logistic_regression, sample_per_class
from msn.eval.splits import Split, load_splits
from msn.models.backbone import MaskedViT


def raw_pixels(dataset: str, train: Split, test: Split) -> list[np.ndarray]:
    """(N, pixels) float32 raw pixels of both splits, at the dataset's native size."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        pixels = load_digits().data.astype(np.float32)  # (1797, 64)
        return [pixels[np.array([int(n) for n in s.names])] for s in (train, test)]
    if dataset == "fashion_mnist":
        return [s.images.images.reshape(len(s.labels), -1).astype(np.float32) for s in (train, test)]
    return [np.stack([np.asarray(s.images[i].convert("RGB"), dtype=np.float32).ravel() for i in range(len(s.labels))])
            for s in (train, test)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--dataset", default="digits", help="digits, fashion_mnist or a folder with train/ and val/")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--splits", type=int, default=5, help="draws of the training shots (default 5)")
    parser.add_argument("--no-knn", action="store_true", help="leave out the k-NN column")
    parser.add_argument("--json", help="also write the table's figures (means) to this JSON file")
    parser.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT,
                        help="the centre share of each image the ViTs see (1: the whole image)")
    args = parser.parse_args()
    try:
        check_crop_pct(args.crop_pct, "--crop-pct")
    except ValueError as e:
        parser.error(str(e))

    train, test = load_splits(args.dataset)
    kind = args.dataset if args.dataset in ("digits", "fashion_mnist") else "folder"
    trained = load_encoder(args.run_dir, crop_pct=args.crop_pct)
    torch.manual_seed(0)
    b = trained.backbone
    random_vit = MaskedViT(b.spec, b.patch_embed.patch_size[0], trained.image_size).eval()
    random = replace(trained, backbone=random_vit, fingerprint="random-init")
    tic = time.perf_counter()
    features = {
        "MSN target encoder": [extract_features(trained, s, None, batch_size=512).numpy() for s in (train, test)],
        "same ViT, random init": [extract_features(random, s, None, batch_size=512).numpy() for s in (train, test)],
        "raw pixels": raw_pixels(kind, train, test),
    }
    print(f"features in {time.perf_counter() - tic:.0f} s; {len(train.labels)} training and {len(test.labels)} test "
          f"images, {args.splits} draws of the shots", flush=True)
    columns = [f"{k}-shot" for k in args.shots] + ([] if args.no_knn else ["k-NN-20, all labels"])
    print("| features | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    figures: dict[str, dict[str, float]] = {}
    for name, (x_train, x_test) in features.items():
        cells, figures[name] = [], {}
        for k in args.shots:
            accs = [logistic_regression(x_train[idx], train.labels[idx], x_test, test.labels, None)
                    for idx in (sample_per_class(train.labels, k, seed) for seed in range(args.splits))]
            cells.append(f"{np.mean(accs):.1f} +- {np.std(accs):.1f}")
            figures[name][f"{k}-shot"] = float(np.mean(accs))
        if not args.no_knn:
            knn = knn_accuracy(torch.from_numpy(x_train), torch.from_numpy(train.labels), torch.from_numpy(x_test),
                               torch.from_numpy(test.labels))
            cells.append(f"{knn:.1f}")
            figures[name]["knn"] = float(knn)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
