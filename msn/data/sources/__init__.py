"""The built-in training sources, one module each; importing this package registers them
(:func:`msn.data.registry.register_source`). Torch-free: a command checks its data before importing torch.

- :mod:`.folder`: a folder of images (ImageFolder layout or flat), with its scanner;
- :mod:`.digits`, :mod:`.fashion_mnist`, :mod:`.synthetic`: the bundled digits, Fashion-MNIST's idx files,
  generated images;
- :mod:`.webdataset`: WebDataset tar shards, with their tar index;
- :mod:`.hf`: Hugging Face datasets;
- :mod:`.custom`: a dataset class of your own (``data.dataset._target_``).
"""

from msn.data.sources import custom, digits, fashion_mnist, folder, hf, synthetic, webdataset  # noqa: F401
