"""Evaluation of a frozen encoder: features (:mod:`.features`), labelled splits (:mod:`.splits`), the
protocols (:mod:`.protocols`: low-shot logistic regression, k-NN, linear probe, fine-tuning) and the
monitor the trainer runs every few steps (:mod:`.monitor`)."""
