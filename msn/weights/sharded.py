"""Sharded checkpoints (``strategy=fsdp``): every process writes its own shards with ``torch.distributed.checkpoint``.

A sharded save is two things in ``RUN_DIR/checkpoints``:

* ``shards/step_XXXXXXX/``: the model's and AdamW's tensors, each process's shards in its own file (DCP's
  ``__R_0.distcp``) and DCP's ``.metadata``. It is written under a temporary name and renamed once every process
  has finished, so a folder with its final name is complete.
* the usual ``last.pt`` / ``step_XXXXXXX.pt``, small: everything else a run needs (step, RNG and sampler state,
  config, data identity) and ``"shards": "shards/step_XXXXXXX"``. It is written (atomically) after the folder it
  names, so a kill -9 at any moment leaves the previous pointer and its complete folder: the newest complete save
  wins.

Readers (:func:`msn.weights.checkpoint.load_checkpoint`, hence resume, ``msn-export``, ``msn-eval``, ``msn-viz`` and
``msn.load_backbone``) get whole tensors, on any number of processes or none: a folder saved by 2 processes resumes on
1 or 4.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from msn.errors import CheckpointError
from msn.utils import distributed
from msn.utils.files import TMP_SUFFIX

SHARDS = "shards"
METADATA = ".metadata"  # DCP's, written last by rank 0: a folder without it is incomplete


def shard_folder_name(step: int) -> str:
    """The folder of a sharded save after ``step`` steps, relative to ``RUN_DIR/checkpoints``."""
    return f"{SHARDS}/step_{step:07d}"


def save_shards(folder: Path, step: int, model_state: dict[str, Any], optimizer_state: dict[Any, Any], *,
                is_main: bool) -> str:
    """Write this process's shards of ``model_state`` and ``optimizer_state`` (AdamW's per-parameter state) into
    ``folder/shards/step_XXXXXXX`` and return that name. A collective: every process calls it; the folder has its
    final name only once every process has written (an earlier folder of the same step, from a run that was rewound,
    is replaced)."""
    import torch.distributed.checkpoint as dcp

    name = shard_folder_name(step)
    final = folder / name
    tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()  # the empty folder exists before anyone writes into it
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    except Exception as e:  # a full disk, an unwritable folder: DCP raises it on every process (it gathers results)
        free = shutil.disk_usage(tmp.parent).free / 2**20
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"could not write the shards of step {step} in {tmp.parent} ({free:.0f} MiB free): "
                              f"{type(e).__name__}: {first}; the previous checkpoint is intact") from None
    if is_main:  # every process has written (DCP's save ends when rank 0 has all their results)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return name


def is_complete(folder: Path) -> bool:
    return (folder / METADATA).is_file()


def read_shards(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a pointer file's, read from ``path``) with the whole tensors of the folder it names put back into
    ``state["model"]`` and ``state["optimizer"]["state"]``: the same dict an unsharded save holds. In this process
    alone, whatever process group exists."""
    import torch.distributed.checkpoint as dcp

    folder = path.parent / state["shards"]
    if not is_complete(folder):
        raise CheckpointError(f"{path} names the shards {folder}, which are missing or incomplete; resume from "
                              "another checkpoint of the run (resume=auto picks the newest complete one)")
    reader = dcp.FileSystemReader(str(folder))
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items() if hasattr(meta, "size")}
    try:
        with warnings.catch_warnings():  # DCP says it assumes one process: that is what no_dist asks for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as e:  # a truncated or damaged shard file
        raise CheckpointError(f"the shards {folder} of {path} cannot be read ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:160]})") from None
    model, moments = {}, {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if part == "model":
            model[rest] = tensor
        else:  # optimizer.INDEX.NAME
            index, _, name = rest.partition(".")
            moments.setdefault(int(index), {})[name] = tensor
    optimizer = {**state["optimizer"], "state": dict(sorted(moments.items()))}
    return {**state, "model": model, "optimizer": optimizer}


def prune_shards(folder: Path, referenced: set[str]) -> list[Path]:
    """Delete the shard folders of ``folder/shards`` that no pointer file names any more (``referenced``: their
    names); temporary ones are left to :func:`remove_stale_shards`. Returns what was removed."""
    removed = []
    for path in sorted((folder / SHARDS).glob("step_*")):
        if f"{SHARDS}/{path.name}" not in referenced:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_stale_shards(folder: Path) -> list[Path]:
    """Delete the temporary folders an interrupted :func:`save_shards` left (a kill -9 while the shards were
    written). Returns what was removed."""
    removed = []
    for tmp in (folder / SHARDS).glob(f".step_*{TMP_SUFFIX}"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed
