"""Weights on disk: reading every format we speak (:mod:`.read`), writing exports and checking where they go
(:mod:`.export`), training checkpoints (:mod:`.checkpoint`), and the state-dict conversions between our keys, the
original MSN's, timm's and Hugging Face ViTMSN's (:mod:`.convert`)."""
