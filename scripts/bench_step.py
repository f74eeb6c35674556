"""Time full MSN training steps (forward, loss, backward, AdamW, EMA) for an experiment on random views.

    python scripts/bench_step.py experiment=msn_vits16 data.batch_size=8 --steps 5

Views are random tensors of the configured sizes, so the figure is the model's step time alone
(data loading is measured by scripts/bench_data.py). Overrides are Hydra overrides of configs/.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from msn.config import CONFIG_DIR, register_configs, to_schema
from msn.masking import MaskGenerator
from msn.model import MSN
from msn.optim import build_optimizer
from msn.train import build_loss, build_schedules, resolve_device, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=msn_vits16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=.", "data.root=.", *args.overrides])
    cfg = to_schema(cfg)
    device = resolve_device(cfg.device)
    d, b = cfg.data, cfg.data.batch_size
    views = [torch.randn(b, 3, d.global_size, d.global_size, device=device) for _ in range(2)]
    views += [torch.randn(b, 3, d.focal_size, d.focal_size, device=device) for _ in range(d.num_focal)]
    model = MSN(cfg.model).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    schedules = build_schedules(cfg, total_steps=1000, steps_in_epoch=100)
    loss_fn = build_loss(cfg.loss)
    m = cfg.masking
    make_masks = MaskGenerator(m.ratio, m.per_sample, m.mask_focal, cfg.model.patch_size, cfg.seed)
    times = []
    for step in range(2 + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        masks = make_masks(step, b, d.global_size, d.focal_size, d.num_focal, device=device)
        train_step(model, loss_fn, optimizer, views, masks, schedules.at(step), cfg.optim.clip_grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    timed = sorted(times[2:])
    print(f"{' '.join(args.overrides)}: arch={cfg.model.arch}/{cfg.model.patch_size} batch={b} "
          f"views=2x{d.global_size}+{d.num_focal}x{d.focal_size} mask={cfg.masking.ratio} device={device} "
          f"threads={torch.get_num_threads()}: median {timed[len(timed) // 2]:.3f} s/step, "
          f"min {timed[0]:.3f} s, {b / timed[len(timed) // 2]:.1f} img/s")


if __name__ == "__main__":
    main()
