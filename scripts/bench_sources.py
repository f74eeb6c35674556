"""The trainer's loader on the same images as a folder, as WebDataset shards and as a Hugging Face dataset,
alternating the sources round by round in one process so that they share the machine's state.

    python scripts/bench_sources.py FOLDER [--workers 1 2] [--rounds 3] [--seconds 8] [--batch 32]

FOLDER is a folder of images (e.g. 500x375 JPEGs from ``msn-bench jpegs 512 DIR``, or photos). The shards
(``msn-shards``) and the ``save_to_disk`` dataset are written to a temporary folder first. Prints, per source
and number of workers, the median images/s over the rounds (the paper's views, photometric stage in the
workers), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from msn.benchmarks.data import images_per_second
from msn.data.loader import EpochSampler, MultiCropDataset, RunSampler, build_loader
from msn.data.multicrop import MultiCropTransform
from msn.data.registry import build_dataset
from msn.data.shard_writer import write_shards
from msn.utils.compose import compose_config


def _hf_copy(folder: Path, out: Path) -> Path:
    import datasets

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    table = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(args.folder, Path(tmp) / "shards", per_shard=1000)
        saved = _hf_copy(args.folder, Path(tmp) / "saved")
        sources = {"folder": ["data=folder", f"data.root={args.folder}"],
                   "webdataset": ["data=webdataset", f'data.shards="{shards.pattern}"'],
                   "hf": ["data=hf", f"data.path={saved}"]}
        results: dict[str, dict[int, list[float]]] = {name: {w: [] for w in args.workers} for name in sources}
        for _ in range(args.rounds):
            for workers in args.workers:
                for name, overrides in sources.items():
                    cfg = compose_config([*overrides, f"data.batch_size={args.batch}", "data.augment_on=cpu",
                                          f"data.num_workers={workers}", "device=cpu"], run_dir=".")
                    base = build_dataset(cfg.data)
                    dataset = MultiCropDataset(base, MultiCropTransform(cfg.data), seed=cfg.seed)
                    order = EpochSampler(len(base), seed=cfg.seed, drop_last=True)
                    loader = build_loader(cfg.data, dataset, RunSampler(order, args.batch, drop_last=True))
                    results[name][workers].append(images_per_second(loader, args.batch, args.seconds, warmup=2))
                    del loader
    summary = {name: {w: statistics.median(v) for w, v in per.items()} for name, per in results.items()}
    for workers in args.workers:
        line = ", ".join(f"{name} {summary[name][workers]:.1f}" for name in sources)
        ratio = summary["webdataset"][workers] / summary["folder"][workers]
        print(f"{workers} worker(s): {line} img/s (median of {args.rounds}); shards / folder {ratio:.2f}")
    print(json.dumps({"rounds": results, "median": summary}))


if __name__ == "__main__":
    main()
