"""Where a loader's CPU time goes: per image, on one thread, the milliseconds of reading the stored bytes,
decoding them, cutting and resizing the views, and the photometric stage (``msn-bench data`` prints them), and
so how many loader cores one GPU needs at a given step rate."""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from msn.data.device_decode import device_jpeg
from msn.data.images import decode_rgb, stored_bytes
from msn.data.loader import decode_stored
from msn.data.multicrop import MultiCropTransform
from msn.data.registry import ImageDataset
from msn.utils.seeding import stream_generator

STAGES = ("read", "header", "decode", "crop_resize", "photometric")


def stage_times(base: ImageDataset, transform: MultiCropTransform, *, count: int = 64, batch: int = 16,
                seed: int = 0) -> dict[str, Any]:
    """Mean CPU milliseconds per image of each stage (``read_ms``, ``decode_ms``, ``crop_resize_ms``,
    ``photometric_ms``, and ``header_ms``: what a worker spends on an image beyond reading it with
    ``data.decode_on=device``, :func:`~msn.data.device_decode.device_jpeg`) over ``count`` images spread over
    ``base``, in this process with one torch thread (the share one loader worker pays). Decoding is the loader's:
    simplejpeg for plain JPEGs, PIL for the rest (:func:`~msn.data.loader.decode_stored`). Reading and decoding go image
    by image; the crops and the photometric stage go ``batch`` images at a time, as a worker runs them (per batch,
    so their fixed costs are shared). A source without ``read_bytes`` (a dataset class of the user's own) has its
    reading inside ``decode_ms`` and ``read_ms`` and ``header_ms`` None. ``images_timed``: how many images were
    timed."""
    indices = sorted({i * len(base) // min(count, len(base)) for i in range(min(count, len(base)))})
    read_bytes = getattr(base, "read_bytes", None)
    decode = decode_stored if stored_bytes(base) is not None else lambda data, name: decode_rgb(io.BytesIO(data), name)
    totals = dict.fromkeys(STAGES, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = []
        for index in indices:
            tic = time.perf_counter()
            if read_bytes is not None:
                data = read_bytes(index)
                totals["read"] += time.perf_counter() - tic
                tic = time.perf_counter()
                device_jpeg(data)
                totals["header"] += time.perf_counter() - tic
                tic = time.perf_counter()
                images.append(decode(data, str(index)))  # as the loader decodes
            else:
                images.append(base[index])
            totals["decode"] += time.perf_counter() - tic
        draws = [transform.draw(stream_generator(seed, "views", 0, index)) for index in indices]
        for start in range(0, len(indices), batch):
            tic = time.perf_counter()
            views = transform.crop(images[start:start + batch], draws[start:start + batch], finish_here=True)
            totals["crop_resize"] += time.perf_counter() - tic
            tic = time.perf_counter()
            transform.finish(views)
            totals["photometric"] += time.perf_counter() - tic
    finally:
        torch.set_num_threads(threads)
    per_image = {f"{stage}_ms": 1000 * total / len(indices) for stage, total in totals.items()}
    if read_bytes is None:
        per_image["read_ms"] = per_image["header_ms"] = None
    return {"images_timed": len(indices), **per_image}


def cores_needed(stages: dict[str, Any], step_images_per_s: float, *, photometric_in_workers: bool,
                 decode_in_workers: bool = True) -> float:
    """Loader cores that keep a step of ``step_images_per_s`` fed: images/s x the workers' CPU seconds per
    image (read, decode, crop and resize, and the photometric stage when it runs in the workers; read and the
    header only when the device decodes, ``data.decode_on=device``)."""
    if not decode_in_workers:
        return step_images_per_s * sum(stages[f"{s}_ms"] or 0.0 for s in ("read", "header")) / 1000
    shares = ["read", "decode", "crop_resize", *(["photometric"] if photometric_in_workers else [])]
    return step_images_per_s * sum(stages[f"{s}_ms"] or 0.0 for s in shares) / 1000
