"""The built-in evaluation protocols, one module each; importing this package imports every module in it, which
registers them (:func:`msn.eval.registry.register_protocol`): a new built-in protocol is a module here. Each imports
torch and scikit-learn when it runs, so that a command's ``--help`` and its checks stay fast.

- :mod:`.lowshot`: the paper's low-shot logistic regression (k images per class, a fraction of the labels);
- :mod:`.knn`: cosine k-nearest neighbours on the whole training split;
- :mod:`.linear`: a linear probe on frozen features;
- :mod:`.finetune`: fine-tuning the whole ViT (transformers' ``ViTMSNForImageClassification``).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
