"""Every random stream of a run, derived from the run's seed by one hashed key function.

A stream is named (``"views"``, ``"masks"``, ...) and keyed by integers (epoch, image, step, rank):
``stream_seed(seed, "masks", step)``. Hashing the whole key keeps streams unrelated across seeds,
names and keys; additive schemes such as ``seed + epoch`` or ``seed * C + step`` give seed 1 the
stream seed 0 had one epoch or step later, which quietly correlates the runs of a seed sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One step of the SplitMix64 mixer: a bijective scramble of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 64-bit seed that depends on every value and their order (nearby keys give unrelated seeds)."""
    h = 0
    for value in values:
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h


def _tag(stream: str) -> int:
    return int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=8).digest(), "little")


def stream_seed(seed: int, stream: str, *key: int) -> int:
    """The 64-bit seed of stream ``stream`` at ``key`` for a run seeded with ``seed``."""
    return mix_seed(seed, _tag(stream), *key)


def stream_generator(seed: int, stream: str, *key: int) -> torch.Generator:
    """A CPU generator seeded with :func:`stream_seed` (the global RNG is left alone)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *key))


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's global torch RNG (stochastic depth): different per rank, reproducible."""
    return stream_seed(seed, "rank", rank, step)


def seed_global_stream(seed: int, rank: int, step: int = 0) -> None:
    """The one place a run sets torch's global generator (CPU and CUDA).

    Stochastic depth (timm's ``drop_path``) draws from the global generator inside the forward pass and
    takes no generator argument, so a run gives each rank its own global stream, :func:`rank_seed`; a
    resume restores the saved state instead, or calls this with the resumed step when the number of
    processes changed. Everything else a run draws comes from :func:`stream_generator`.
    """
    torch.manual_seed(rank_seed(seed, rank, step))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's global generator seeded with ``seed``, then put the caller's state back.

    For code that draws from the global generator and takes no ``generator`` (module initialisers,
    ``from_pretrained``'s new head, dropout): its draws are a function of ``seed`` alone, and the host
    (a notebook, the test suite, the trainer) finds its own stream as it left it. ``device``: a CUDA device
    whose generator is forked and seeded too.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
