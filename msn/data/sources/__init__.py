"""The built-in training sources, one module each; importing this package imports every module in it, which
registers them (:func:`msn.data.registry.register_source`): a new built-in source is a module here and a YAML file in
``msn/configs/data/``, nothing else. Torch-free: a command checks its data before importing torch.

- :mod:`.folder`: a folder of images (ImageFolder layout or flat), with its scanner;
- :mod:`.digits`, :mod:`.fashion_mnist`, :mod:`.synthetic`: the bundled digits, Fashion-MNIST's idx files,
  generated images;
- :mod:`.webdataset`: WebDataset tar shards, with their tar index;
- :mod:`.hf`: Hugging Face datasets;
- :mod:`.custom`: a dataset class of your own (``data.dataset._target_``).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
