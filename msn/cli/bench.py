"""msn-bench: measure the training step, the input pipeline, or both together, on this machine.

    msn-bench step OVERRIDES... [--steps N] [--warmup N] [--reference] [--max-batch]
    msn-bench data [--source folder|webdataset|hf] [--root DIR] [--workers W] [--threads N] [--seconds S]
                   [OVERRIDES...]
    msn-bench e2e OVERRIDES... [--steps N] [--warmup N]
    msn-bench jpegs N OUT

OVERRIDES are Hydra overrides as for msn-pretrain, for example
    msn-bench step experiment=msn_vits16 data.batch_size=128 precision=bf16 compile=true device=cuda
    msn-bench data --root /data/train --workers 15 experiment=msn_vits16 data.batch_size=128
    msn-bench data --source webdataset 'data.shards="/data/shards/shard-{000000..000099}.tar"' --workers 2
    msn-bench e2e experiment=msn_vits16 data.root=/data/train data.batch_size=128 data.num_workers=15 precision=bf16

step: the training step alone on random views already on the device: step time, images/s, peak memory,
  FLOPs per image (torch's FLOP counter), a large matmul's FLOP/s in the same run and the MFU against it;
  --reference also times the original MSN step (msn.benchmarks.reference) and prints the ratio; --max-batch doubles
  data.batch_size until the GPU runs out of memory.
data: images/s of the multi-crop loader on a source (the images in DIR; or --source webdataset / hf), with
  the paper's views unless OVERRIDES say otherwise (data.augment_on chooses where the photometric stage
  runs), and of a reference pipeline on the same images in the same run (torchvision's PIL transforms view
  by view, as the original code), with the ratio.
e2e: msn-pretrain for --steps steps; its steady images/s after --warmup steps, and the ratio to the
  step alone on the same device.
jpegs: write N photo-like 500x375 JPEGs (quality 90, in 10 class folders) to OUT, to benchmark on when no
  image folder is at hand.
Each command's last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from msn.cli.errors import fail
from msn.cli.logs import console_logging
from msn.errors import ConfigError, MSNError
from msn.utils.arguments import check_number, check_numbers, check_writable

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _print_step(r: dict[str, Any]) -> None:
    print(f"{' '.join(r['overrides'])}: batch {r['batch']} on {r['device_name']} ({r['precision']}, "
          f"compile={r['compile']}, torch {r['torch']})")
    print(f"  step {r['step_s'] * 1e3:.1f} ms, {r['img_s']:.1f} img/s, peak memory {r['peak_mem_gib']:.2f} GiB"
          + (f" with activation checkpointing, {r['peak_mem_gib_without_checkpointing']:.2f} GiB without"
             if r.get("grad_checkpointing") else ""))
    speed = r["matmul_tflops"]  # a CPU's is a fraction of a TFLOP/s: shown in GFLOP/s, not as 0.0
    speed_text = f"{speed:.1f} TFLOP/s" if speed >= 1 else f"{speed * 1e3:.1f} GFLOP/s"
    print(f"  {r['flops_per_image'] / 1e9:.2f} GFLOP per image; matmul {speed_text} -> MFU {100 * r['mfu']:.1f} %")
    if "state_gib_per_process" in r:
        processes = f"{r['processes']} processes, strategy={r['strategy']}" if r["processes"] > 1 else "one process"
        print(f"  {processes}: weights, gradients and AdamW state {r['state_gib_per_process']:.3f} GiB per process "
              f"(computed {r['state_gib_per_process_computed']:.3f})")
    if "ratio" in r:
        print(f"  original step: {r['reference_img_s']:.1f} img/s, peak {r['reference_peak_mem_gib']:.2f} GiB, "
              f"{r['reference_flops_per_image'] / 1e9:.2f} GFLOP per image -> ours is {r['ratio']:.2f}x")


def _print_data(r: dict[str, Any]) -> None:
    print(f"{r['images']} images in {r['root']} ({r['source']}): views {r['views']}, batch {r['batch']}, "
          f"{r['workers']} workers, {r['threads']} thread(s), decoded on the {r['decode_on']}, photometric stage on "
          f"the {r['augment_on']} ({r['device']})")
    turns = ", ".join(f"{t['ours_images_per_s']:.0f}/{t['reference_images_per_s']:.0f}" for t in r["rounds"])
    print(f"  ours {r['ours_images_per_s']:.1f} img/s, reference {r['reference_images_per_s']:.1f} img/s "
          f"-> {r['ratio']:.2f}x (measured alternately, ours/reference per turn: {turns})")
    t = r["stages"]
    read = "in decode" if t["read_ms"] is None else f"{t['read_ms']:.2f} ms (+ header {t['header_ms']:.2f} ms)"
    print(f"  per image on one CPU thread ({t['images_timed']} images): read {read}, decode {t['decode_ms']:.2f} ms, "
          f"crop+resize {t['crop_resize_ms']:.2f} ms, photometric {t['photometric_ms']:.2f} ms")
    if r["cores_per_gpu"] is not None:
        share = ("read" if r["decode_on"] == "device" else "read, decode, crop+resize") + (
            ", photometric" if r["augment_on"] == "cpu" else "")
        print(f"  a step of {r['step_images_per_s']:g} img/s needs about {r['cores_per_gpu']:.1f} loader cores per "
              f"GPU ({share} in the workers)")


def _print_e2e(r: dict[str, Any]) -> None:
    print(f"{' '.join(r['overrides'])}: batch {r['batch']} on {r['device_name']}, {r['num_workers']} workers, "
          f"augment_on={r['augment_on']}, data.decode_on={r['decode_on']}")
    print(f"  trainer {r['e2e_images_per_s']:.1f} img/s (steps {r['warmup'] + 1}-{r['steps']}), step alone "
          f"{r['step_images_per_s']:.1f} img/s -> {r['ratio']:.2f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msn-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("step", help="time the training step on random views",
                               description="Time the training step; OVERRIDES as for msn-pretrain.")
    step.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=msn_vits16 precision=bf16")
    step.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    step.add_argument("--reference", action="store_true", help="also time the original step; print the ratio")
    step.add_argument("--max-batch", action="store_true",
                      help="instead: the largest data.batch_size (doubling) that fits in GPU memory")
    data = commands.add_parser("data", help="images/s of the input pipeline, against a reference pipeline",
                               description="Images/s of the multi-crop loader on a training source (a folder, "
                                           "WebDataset shards or a Hugging Face dataset), and of torchvision's "
                                           "PIL transforms view by view on the same images; OVERRIDES as for "
                                           "msn-pretrain (the paper's views by default).")
    data.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=128 data.augment_on=device "
                                                   "data.shards=... data.path=...")
    data.add_argument("--source", default="folder",
                      help="the data= source (default folder): any registered source (folder, webdataset, hf, custom, "
                           "...); webdataset takes data.shards=, hf data.path=, custom data.dataset=")
    data.add_argument("--root", default=None, help="folder of images for --source folder (or data.root=)")
    data.add_argument("--workers", type=int, default=None, help="loader workers for both (default: data.num_workers)")
    data.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    data.add_argument("--seconds", type=float, default=10.0,
                      help="timed seconds per pipeline, in 3 turns alternating with the other (default 10)")
    data.add_argument("--step-img-s", type=float, default=None, dest="step_img_s",
                      help="the training step's images/s (msn-bench step): print the loader cores one GPU needs")
    e2e = commands.add_parser("e2e", help="the trainer's images/s against the step alone",
                              description="Run msn-pretrain for --steps steps and compare its steady images/s "
                                          "with the step alone; OVERRIDES as for msn-pretrain.")
    e2e.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=msn_vits16 data.root=/data")
    e2e.add_argument("--steps", type=int, default=60, help="trainer steps (default 60)")
    e2e.add_argument("--warmup", type=int, default=20, help="first steps left out (default 20)")
    jpegs = commands.add_parser("jpegs", help="write photo-like 500x375 JPEGs to benchmark the loader on",
                                description="Write N photo-like 500x375 JPEGs (quality 90) to OUT/c0 ... c9.")
    jpegs.add_argument("count", type=int, help="how many images")
    jpegs.add_argument("out", help="folder to write them to")
    return parser


# Each numeric option and the values it allows (msn.utils.arguments.check_number); e2e's --warmup, below.
NUMBERS = {"--steps": ">= 1", "--warmup": ">= 0", "--seconds": "> 0", "--workers": ">= 0", "--threads": ">= 1",
           "--step-img-s": "> 0"}


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers (and a jpegs OUT that could not be written) before any work."""
    check_numbers(args, NUMBERS)
    if args.command == "e2e" and not 0 < args.warmup < args.steps:
        raise ConfigError(f"--warmup {args.warmup} must lie between 0 and --steps {args.steps}, both excluded: the "
                          "steps after the warm-up are the ones timed")
    if args.command == "jpegs":
        check_number("N", args.count, ">= 1")
        check_writable(args.out, args.out, "give an OUT you can write to")


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``msn-bench``."""
    args = _parser().parse_args(argv)
    console_logging()
    try:
        check_args(args)
        result = _run(args)
    except (MSNError, HydraException, OmegaConfBaseException) as e:  # bad input, or an override Hydra cannot compose
        return fail("msn-bench", e)
    if result is not None:
        print(json.dumps(result))
    return 0


def compose_bench_config(overrides: list[str]) -> DictConfig:
    """The msn-pretrain config for ``overrides``; a folder dataset needs no root here (no data is read)."""
    from msn.utils.compose import compose_config

    return compose_config(overrides, run_dir=".", placeholder_root=True)


def _set_matmul(cfg: DictConfig) -> None:
    """TF32 as the run would have it (``cfg.tf32``): process-wide, so the command sets it, not the library."""
    from msn.utils.device import configure_matmul, resolve_device

    configure_matmul(resolve_device(cfg.device), cfg.tf32)


def _run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The chosen benchmark, its report printed; returns its JSON record (None on a process other than rank 0).
    (Imports deferred: --help stays fast.)"""
    if args.command == "step":
        from msn.benchmarks.step import bench_step, max_batch

        cfg = compose_bench_config(args.overrides)
        _set_matmul(cfg)
        if args.max_batch:
            result = {"overrides": args.overrides, "max_batch": max_batch(cfg)}
            print(f"largest batch that fits: {result['max_batch']}")
            return result
        result = bench_step(cfg, overrides=args.overrides, steps=args.steps, warmup=args.warmup,
                            reference=args.reference)
        from msn.utils.distributed import is_main_process

        if not is_main_process():  # under torchrun every process measured; rank 0 reports
            return None
        _print_step(result)
        return result
    if args.command == "data":
        import torch

        from msn.benchmarks.data import bench_data

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        root = [f"data.root={args.root}"] if args.root is not None else []
        from msn.config import CONFIG_DIR

        # a built-in source has its own config file; a plugin's source takes data=folder's views, under its name
        source = ([f"data={args.source}"] if (CONFIG_DIR / "data" / f"{args.source}.yaml").is_file() else
                  ["data=folder", f"data.name={args.source}"])
        cfg = compose_bench_config([*source, *args.overrides, *root])
        from msn.data.loader import loader_workers

        workers = loader_workers(cfg.data.num_workers) if args.workers is None else args.workers
        result = bench_data(cfg, workers=workers, seconds=args.seconds, step_images_per_s=args.step_img_s)
        _print_data(result)
        return result
    if args.command == "jpegs":
        from msn.benchmarks.jpegs import write_jpegs

        write_jpegs(args.count, args.out)
        print(f"wrote {args.count} JPEGs of 500x375 px under {args.out}")
        return {"count": args.count, "out": args.out}
    from msn.benchmarks.e2e import bench_e2e

    cfg = compose_bench_config(args.overrides)  # a bad override: one line here, before the trainer starts
    _set_matmul(cfg)
    result = bench_e2e(cfg, overrides=args.overrides, steps=args.steps, warmup=args.warmup)
    _print_e2e(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
