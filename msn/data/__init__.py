"""Images in, multi-crop views out (docs/design.md, "One step").

    RunSampler ──[(epoch, index), ...]──> MultiCropDataset ──> base dataset[index] (PIL RGB)
                                               │
                                               ├─> crop (workers): uint8 crops at output size, flipped
                                               └─> finish (workers, or the training GPU): colour jitter,
                                                   grayscale, blur, normalisation

The base dataset comes from a registered source (:mod:`~msn.data.registry`; the built-ins in
:mod:`~msn.data.sources`, or a dataset class of your own with ``data=custom``). Modules:
:mod:`~msn.data.images` (decoding), :mod:`~msn.data.crops` (RandomResizedCrop, batched),
:mod:`~msn.data.photometric` (per-view colour and blur operations, any device), :mod:`~msn.data.multicrop`
(the two-stage MSN transform and the batch it makes), :mod:`~msn.data.loader` (keyed dataset, samplers,
DataLoader) and :mod:`~msn.data.shard_writer` (``msn-shards``).

Randomness: the augmentation of image ``index`` in ``epoch`` draws only from a private generator
seeded by a hash of ``(seed, epoch, index)``, so a view is a pure function of that key: identical for
any ``num_workers``, any request order, any process, on the CPU or the GPU (to float tolerance), and
after a resume.

The names below load on first use: ``import msn.data`` imports neither torch nor the sources.
"""

from __future__ import annotations

from msn.utils.lazy import lazy_names

_HOMES = {
    "Source": "msn.data.registry", "register_source": "msn.data.registry", "get_source": "msn.data.registry",
    "source_names": "msn.data.registry", "build_dataset": "msn.data.registry",
    "load_rgb": "msn.data.images",
    "ImageFolderDataset": "msn.data.sources.folder", "DigitsDataset": "msn.data.sources.digits",
    "FashionMNISTDataset": "msn.data.sources.fashion_mnist", "SyntheticDataset": "msn.data.sources.synthetic",
    "WebDatasetImages": "msn.data.sources.webdataset", "HFImages": "msn.data.sources.hf",
    "MultiCropTransform": "msn.data.multicrop", "MultiCropDataset": "msn.data.loader",
    "write_shards": "msn.data.shard_writer",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
