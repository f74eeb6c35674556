"""Weights on disk: training checkpoints (:mod:`.checkpoint`), state-dict conversions between our keys, the
original MSN's, timm's and Hugging Face ViTMSN's (:mod:`.convert`), and the export formats, their model card
and reading any of them back (:mod:`.formats`)."""
