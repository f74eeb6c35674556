"""Images in, multi-crop views out (docs/design.md, "One step").

    RunSampler ──[(epoch, index), ...]──> MultiCropDataset ──> base dataset[index] (PIL RGB)
                                               │
                                               ├─> crop (workers): uint8 crops at output size, flipped
                                               └─> finish (workers, or the training GPU): colour jitter,
                                                   grayscale, blur, normalisation

Modules: :mod:`~msn.data.datasets` (base datasets), :mod:`~msn.data.crops` (RandomResizedCrop,
batched), :mod:`~msn.data.photometric` (per-view colour and blur operations, any device),
:mod:`~msn.data.multicrop` (the two-stage MSN transform and the batch it makes) and
:mod:`~msn.data.loader` (keyed dataset, samplers, DataLoader).

Randomness: the augmentation of image ``index`` in ``epoch`` draws only from a private generator
seeded by a hash of ``(seed, epoch, index)``, so a view is a pure function of that key: identical for
any ``num_workers``, any request order, any process, on the CPU or the GPU (to float tolerance), and
after a resume.
"""

from msn.data.crops import (
    dense_resize_is_cheap,
    resized_crops,
    resized_crops_dense,
    resized_crops_loop,
    sample_boxes,
    to_uint8_image,
)
from msn.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    DigitsDataset,
    FashionMNISTDataset,
    ImageDataset,
    ImageFolderDataset,
    SyntheticDataset,
    check_data_root,
    find_fashion_mnist,
    load_rgb,
    read_idx,
    to_8bit,
)
from msn.data.loader import (
    EpochSampler,
    Key,
    MultiCropDataset,
    RunSampler,
    SkippedImages,
    build_loader,
    collate_views,
    epoch_length,
    loader_workers,
    samples_per_replica,
    steps_per_epoch,
)
from msn.data.multicrop import (
    MultiCropTransform,
    ViewBatch,
    ViewGroup,
    ViewParams,
    augment_in_workers,
    device_views,
    single_threaded,
)
from msn.data.photometric import (
    PhotometricParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    grayscale,
    photometric,
)
from msn.data.sources import DATASETS, build_dataset

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "augment_in_workers",
    "blur_kernel_size", "build_dataset", "build_loader", "check_data_root", "collate_views", "color_jitter",
    "DataError", "DATASETS", "dense_resize_is_cheap", "device_views", "DigitsDataset", "epoch_length",
    "EpochSampler",
    "FashionMNISTDataset", "find_fashion_mnist", "gaussian_blur", "grayscale", "IMAGE_EXTENSIONS", "ImageDataset",
    "ImageFolderDataset", "Key", "load_rgb", "loader_workers", "MultiCropDataset", "MultiCropTransform", "photometric",
    "PhotometricParams", "read_idx", "resized_crops", "resized_crops_dense", "resized_crops_loop", "RunSampler",
    "sample_boxes", "samples_per_replica", "single_threaded", "SkippedImages", "steps_per_epoch",
    "SyntheticDataset", "to_8bit", "to_uint8_image", "ViewBatch", "ViewGroup", "ViewParams",
]
