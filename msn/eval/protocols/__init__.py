"""The built-in evaluation protocols, one module each; importing this package registers them
(:func:`msn.eval.registry.register_protocol`). Each imports torch and scikit-learn when it runs, so that a
command's ``--help`` and its checks stay fast.

- :mod:`.lowshot`: the paper's low-shot logistic regression (k images per class, a fraction of the labels);
- :mod:`.knn`: cosine k-nearest neighbours on the whole training split;
- :mod:`.linear`: a linear probe on frozen features;
- :mod:`.finetune`: fine-tuning the whole ViT (transformers' ``ViTMSNForImageClassification``).
"""

from msn.eval.protocols import finetune, knn, linear, lowshot  # noqa: F401
