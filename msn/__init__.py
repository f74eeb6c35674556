"""MSN: Masked Siamese Networks pretraining for Vision Transformers (Assran et al., 2022)."""

__version__ = "0.1.0"
