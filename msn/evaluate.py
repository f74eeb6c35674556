"""``msn-eval``: measure a backbone the way the paper does, on frozen target-encoder features.

    msn-eval PROTOCOL MODEL [--dataset digits|PATH] [--shots 1 2 5] [--fraction 0.01] [--splits 3] ...

Protocols: ``lowshot`` (k images per class / a label fraction, L2-penalised multinomial logistic
regression on centred, L2-normalised CLS features of a centre crop), ``knn`` (cosine, k=20,
temperature-weighted votes), ``linear`` (a linear probe trained on cached features), ``finetune``
(``ViTMSNForImageClassification`` from an ``hf`` export). MODEL is a training checkpoint, a run
directory, an original MSN ``.pth.tar`` or a Hugging Face ViTMSN folder; the target encoder is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from msn.backbone import MaskedViT, ViTArch
from msn.checkpoint import CheckpointError
from msn.convert import ConversionError, hf_to_backbone, split_encoder
from msn.data import DataError, DigitsDataset, ImageFolderDataset
from msn.export import IMAGENET_MEAN, IMAGENET_STD, export_hf, infer_backbone, read_source, source_arch

DIGITS_TEST_SIZE = 540  # fixed, stratified digits split: 1257 train / 540 test images (seed 0)
PROTOCOLS = ("lowshot", "knn", "linear", "finetune")


# ----------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """A frozen backbone with the preprocessing it was trained with."""

    backbone: MaskedViT
    image_size: int
    mean: list[float]
    std: list[float]
    fingerprint: str  # identifies the weights, for the feature cache
    path: Path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_encoder(model: str | Path) -> Encoder:
    """The target backbone of a checkpoint / run directory / original MSN file, or an HF ViTMSN folder."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        weights = path / "model.safetensors"
        backbone_sd = hf_to_backbone(load_file(weights))
        hf = json.loads((path / "config.json").read_text())
        arch = ViTArch(hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                       hf["intermediate_size"] / hf["hidden_size"])
        processor = path / "preprocessor_config.json"
        pre = json.loads(processor.read_text()) if processor.is_file() else {}
        mean, std = pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD)
    else:
        source = read_source(path)
        weights = source.path
        backbone_sd, _ = split_encoder(source.model, "target.")
        arch = source_arch(source.model_cfg)
        data = source.config.data if source.config is not None else None
        mean = list(data.mean) if data is not None else IMAGENET_MEAN
        std = list(data.std) if data is not None else IMAGENET_STD
    sizes = infer_backbone(backbone_sd)
    backbone = MaskedViT(arch, sizes["patch_size"], sizes["img_size"])
    backbone.load_state_dict(backbone_sd)
    return Encoder(backbone.eval(), sizes["img_size"], list(mean), list(std), _fingerprint(weights), path)


class _Subset(Dataset):
    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])]


@dataclass
class Split:
    """Labelled images: ``images[i]`` is a PIL image; ``labels`` (N,); ``ident`` names it for the cache."""

    images: Dataset
    labels: np.ndarray
    ident: str
    names: list[str]  # per image: path relative to the split root (folders) or the index (digits)


def digits_splits() -> tuple[Split, Split]:
    """The fixed digits split: stratified, seed 0, 540 test images (30 %), the rest for training."""
    from sklearn.model_selection import train_test_split

    base = DigitsDataset(32)
    labels = np.array(base.targets)
    train_idx, test_idx = train_test_split(np.arange(len(base)), test_size=DIGITS_TEST_SIZE, stratify=labels,
                                           random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    make = lambda idx, name: Split(_Subset(base, idx), labels[idx], f"digits-{name}", [str(i) for i in idx])  # noqa: E731
    return make(train_idx, "train"), make(test_idx, "test")


def folder_splits(root: Path) -> tuple[Split, Split]:
    """``root/train`` and ``root/val`` in ImageFolder layout (``val`` may be named ``test``)."""
    val = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not val.is_dir():
        raise DataError(f"--dataset {root}: expected {root}/train and {root}/val (ImageFolder layout)")
    splits = []
    for name, folder in (("train", root / "train"), ("val", val)):
        ds = ImageFolderDataset(folder)
        labels = np.array(ds.targets)
        if (labels < 0).any():
            raise DataError(f"{folder} has images outside class folders; use folder/CLASS/image.jpg")
        rel = [str(p.relative_to(folder)) for p in ds.paths]
        splits.append(Split(ds, labels, f"folder-{root.resolve()}-{name}", rel))
    return splits[0], splits[1]


def load_splits(dataset: str) -> tuple[Split, Split]:
    return digits_splits() if dataset == "digits" else folder_splits(Path(dataset))


def read_subset_file(path: Path, train: Split) -> np.ndarray:
    """Indices into ``train`` of the images a subset file lists (original MSN format: one path a line).

    For ``digits`` a line is an index into the digits training split. Every listed image must exist.
    """
    lookup = {name: i for i, name in enumerate(train.names)}
    indices = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        token = line.split()[0] if line.strip() else ""
        if not token or token.startswith("#"):
            continue
        if token not in lookup:
            raise DataError(f"{path}:{n}: {token!r} is not an image of the training split")
        indices.append(lookup[token])
    if not indices:
        raise DataError(f"{path} lists no images")
    return np.array(indices)


# ----------------------------------------------------------------------------------------------------
# Features (extracted once, cached on disk)
# ----------------------------------------------------------------------------------------------------


def eval_transform(encoder: Encoder) -> v2.Compose:
    """Resize to size * 256/224 (bicubic) then centre-crop ``size``: the paper's 256 -> 224 protocol."""
    size = encoder.image_size
    resize = v2.Resize(int(round(size * 256 / 224)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(encoder.mean, encoder.std)])


class _Transformed(Dataset):
    def __init__(self, images: Dataset, transform: v2.Compose) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


@torch.no_grad()
def cls_features(backbone: MaskedViT, x: torch.Tensor, feature: str = "cls", last_blocks: int = 1) -> torch.Tensor:
    """CLS features of a batch: (B, C, H, W) -> (B, last_blocks * D).

    ``feature="cls"``: the CLS token after the final norm (each of the last ``last_blocks`` block outputs is
    normed, then concatenated); ``"cls_prenorm"``: the raw block outputs' CLS tokens.
    """
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o[:, 0]))
             for blk in backbone.blocks[-last_blocks:]]
    try:
        backbone.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    if feature == "cls":
        outputs = [backbone.norm(o) for o in outputs]
    return torch.cat(outputs, dim=1)


def extract_features(encoder: Encoder, split: Split, cache_dir: Path | None, feature: str = "cls",
                     last_blocks: int = 1, batch_size: int = 128, num_workers: int = 0) -> torch.Tensor:
    """(N, D) features of ``split``, read from the cache when a valid entry exists, else computed and stored.

    The cache key hashes the weights' fingerprint, the split and the feature options; an unreadable or
    inconsistent cache file is rebuilt, never trusted.
    """
    key = hashlib.sha1(json.dumps([encoder.fingerprint, split.ident, len(split.labels), feature, last_blocks,
                                   encoder.image_size, encoder.mean, encoder.std]).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] == key and cached["features"].shape[0] == len(split.labels):
                return cached["features"]
            reason = "it does not match"
        except Exception as e:  # truncated / corrupted file: rebuild rather than trust it
            reason = f"{type(e).__name__}"
        print(f"feature cache {path} is unusable ({reason}); rebuilding", file=sys.stderr)
    loader = DataLoader(_Transformed(split.images, eval_transform(encoder)), batch_size=batch_size,
                        num_workers=num_workers)
    chunks = [cls_features(encoder.backbone, x, feature, last_blocks)
              for x in tqdm(loader, desc=f"features {split.ident[:40]}", file=sys.stderr, leave=False)]
    features = torch.cat(chunks)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "features": features}, tmp)
        tmp.replace(path)
    return features


# ----------------------------------------------------------------------------------------------------
# Protocols on features
# ----------------------------------------------------------------------------------------------------


def centre_and_normalise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Subtract the training mean, then L2-normalise every row (the paper's low-shot preprocessing)."""
    mean = train.mean(axis=0, keepdims=True)
    out = []
    for x in (train, *others):
        x = x - mean
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def sample_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` images of every class (fewer if a class has fewer), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def sample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of the images (at least one per class), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picks))


def logistic_regression(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                        penalty: float | None) -> float:
    """Test accuracy (%) of multinomial L2 logistic regression; ``penalty`` is sklearn's C.

    ``penalty=None`` picks C by cross-validation on the training shots only (when every class has at
    least two; else C = 1).
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    x_train, x_test = centre_and_normalise(x_train, x_test)
    counts = np.bincount(y_train)[np.unique(y_train)]
    if penalty is None and counts.min() >= 2:
        clf = LogisticRegressionCV(Cs=np.logspace(-2, 3, 6).tolist(), cv=int(min(3, counts.min())), max_iter=1000)
    else:
        clf = LogisticRegression(C=1.0 if penalty is None else penalty, max_iter=1000)
    with warnings.catch_warnings():  # sklearn 1.9 announces a change of LogisticRegressionCV's attributes
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, y_train)
    return 100.0 * float((clf.predict(x_test) == y_test).mean())


def knn_accuracy(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine k-NN with votes weighted by ``exp(similarity / temperature)``; accuracy in %."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):
        sim = test[start:start + 1024] @ train.T  # (b, N)
        top, idx = sim.topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, y_train[idx], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == y_test[start:start + 1024]).sum())
    return 100.0 * correct / len(test)


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 epochs: int = 100, lr: float = 1e-3, seed: int = 0) -> float:
    """A linear layer trained with AdamW (full batch) on standardised frozen features; accuracy in %."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    layer = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        loss = F.cross_entropy(layer(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float((layer(x_test).argmax(1) == y_test).float().mean())


def finetune(encoder: Encoder, train: Split, test: Split, epochs: int, lr: float, batch_size: int,
             seed: int) -> float:
    """Fine-tune ``ViTMSNForImageClassification`` from an ``hf`` export of the encoder; test accuracy in %."""
    from transformers import ViTMSNForImageClassification

    with tempfile.TemporaryDirectory() as tmp:
        folder = encoder.path
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            folder = export_hf(read_source(encoder.path), Path(tmp) / "hf")
        torch.manual_seed(seed)
        model = ViTMSNForImageClassification.from_pretrained(folder, num_labels=int(train.labels.max()) + 1)
    transform = eval_transform(encoder)
    labels = torch.from_numpy(train.labels)
    loader = DataLoader(_Transformed(train.images, transform), batch_size=batch_size)
    images = torch.cat(list(loader))  # small evaluation sets: keep the preprocessed images in memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="finetune", file=sys.stderr, leave=False):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = model(pixel_values=images[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_loader = DataLoader(_Transformed(test.images, transform), batch_size=batch_size)
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=x).logits.argmax(1) for x in test_loader])
    return 100.0 * float((predictions.numpy() == test.labels).mean())


class Monitor:
    """Representation quality during pretraining: k-NN or 5-shot accuracy (%) of the target backbone.

    The labelled splits are loaded once; every call extracts fresh features (no cache: the weights change).
    """

    def __init__(self, protocol: str, dataset: str, image_size: int, mean: list[float], std: list[float]) -> None:
        self.protocol = protocol
        self.train, self.test = load_splits(dataset)
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)

    def __call__(self, backbone: MaskedViT) -> float:
        was_training = backbone.training
        encoder = Encoder(backbone.eval(), self.image_size, self.mean, self.std, "", Path("."))
        try:
            x_train, x_test = (extract_features(encoder, s, None).float() for s in (self.train, self.test))
        finally:
            backbone.train(was_training)
        if self.protocol == "knn":
            y_train, y_test = torch.from_numpy(self.train.labels), torch.from_numpy(self.test.labels)
            return knn_accuracy(x_train, y_train, x_test, y_test)
        idx = sample_per_class(self.train.labels, 5, seed=0)
        return logistic_regression(x_train.numpy()[idx], self.train.labels[idx], x_test.numpy(), self.test.labels, 1.0)


def summarise(accuracies: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "splits": accuracies}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run one protocol; return the ``results.json`` content."""
    encoder = load_encoder(args.model)
    train, test = load_splits(args.dataset)
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {"splits": args.splits, "feature": args.feature, "last_blocks": args.last_blocks}
    if args.protocol == "finetune":
        settings.update(epochs=args.epochs, lr=args.lr)
        accs = [finetune(encoder, train, test, args.epochs, args.lr, args.batch_size, s) for s in range(args.splits)]
        results["100%"] = summarise(accs)
    else:
        cache = None if args.no_cache else Path(args.cache_dir)
        feats = [extract_features(encoder, s, cache, args.feature, args.last_blocks, args.batch_size,
                                  args.num_workers).float() for s in (train, test)]
        x_train, x_test = feats
        y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
        if args.protocol == "lowshot":
            settings.update(penalty=args.penalty, shots=args.shots, fraction=args.fraction)
            xtr, xte = x_train.numpy(), x_test.numpy()
            run = lambda idx: logistic_regression(xtr[idx], train.labels[idx], xte, test.labels, args.penalty)  # noqa: E731
            if args.subset_file:
                idx = read_subset_file(Path(args.subset_file), train)
                results[Path(args.subset_file).stem] = summarise([run(idx)])
            else:
                for k in args.shots:
                    results[str(k)] = summarise([run(sample_per_class(train.labels, k, s)) for s in range(args.splits)])
                if args.fraction:
                    key = f"{args.fraction * 100:g}%"
                    results[key] = summarise([run(sample_fraction(train.labels, args.fraction, s))
                                              for s in range(args.splits)])
        elif args.protocol == "knn":
            settings.update(k=args.k, temperature=args.temperature)
            results["100%"] = summarise([knn_accuracy(x_train, y_train, x_test, y_test, args.k, args.temperature)])
        else:
            settings.update(epochs=args.epochs, lr=args.lr)
            results["100%"] = summarise([linear_probe(x_train, y_train, x_test, y_test, args.epochs, args.lr, s)
                                         for s in range(args.splits)])
    return {"protocol": args.protocol, "model": str(args.model), "dataset": args.dataset,
            "train_images": len(train.labels), "test_images": len(test.labels), "settings": settings,
            "results": results}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['protocol']} on {report['dataset']} ({report['model']})", f"{'setting':>10}  accuracy (%)"]
    for name, r in report["results"].items():
        lines.append(f"{name:>10}  {r['mean']:6.2f} +- {r['std']:5.2f}  ({len(r['splits'])} splits)")
    return "\n".join(lines)


def update_model_card(folder: Path, report: dict[str, Any]) -> None:
    """Add (or replace) this protocol's results in an ``hf`` export's README.md."""
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    marker = f"## Evaluation: {report['protocol']} on {report['dataset']}"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end != -1 else "")
    rows = "\n".join(f"| {k} | {r['mean']:.2f} +- {r['std']:.2f} | {len(r['splits'])} |"
                     for k, r in report["results"].items())
    text = text.rstrip() + f"\n\n{marker}\n\n| setting | top-1 (%) | splits |\n|---|---|---|\n{rows}\n"
    card.write_text(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msn-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("model", help="training checkpoint, run directory, original MSN .pth.tar or HF ViTMSN folder")
    p.add_argument("--dataset", default="digits", help="digits, or a folder with train/ and val/ (ImageFolder)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5], help="lowshot: images per class")
    p.add_argument("--fraction", type=float, default=0.01, help="lowshot: label fraction (0 to skip)")
    p.add_argument("--splits", type=int, default=3, help="fixed random splits (seeds 0..n-1)")
    p.add_argument("--subset-file", help="lowshot: train on exactly these images (one path a line; digits: index)")
    p.add_argument("--penalty", type=float, default=None, help="lowshot: sklearn C; default: cross-validated")
    p.add_argument("--feature", choices=("cls", "cls_prenorm"), default="cls",
                   help="CLS after (default) or before the final norm")
    p.add_argument("--last-blocks", type=int, default=1, help="concatenate the CLS of the last n blocks")
    p.add_argument("--k", type=int, default=20, help="knn: neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    p.add_argument("--epochs", type=int, default=100, help="linear / finetune: epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="linear / finetune: learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "msn" / "features"))
    p.add_argument("--no-cache", action="store_true", help="always recompute features")
    p.add_argument("--output", default="results.json")
    p.add_argument("--update-card", action="store_true", help="write the results into an hf export's README.md")
    p.add_argument("--wandb", action="store_true", help="also log the results to wandb (offline)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-eval``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.splits < 1 or args.last_blocks < 1 or args.k < 1 or not 0 <= args.fraction < 1 or any(
            k < 1 for k in args.shots):
        parser.error("--splits, --last-blocks, --k and --shots must be >= 1 and --fraction in [0, 1)")
    if args.update_card and not (Path(args.model) / "config.json").is_file():
        parser.error("--update-card needs MODEL to be an hf export folder (msn-export --format hf)")
    try:
        report = evaluate(args)
    except (CheckpointError, ConversionError, DataError) as e:
        print(f"msn-eval: error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.update_card:
        update_model_card(Path(args.model), report)
    if args.wandb:
        import wandb

        run = wandb.init(project="msn", job_type="eval", mode="offline", config=report["settings"])
        run.log({f"eval/{report['protocol']}/{k}": r["mean"] for k, r in report["results"].items()})
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
