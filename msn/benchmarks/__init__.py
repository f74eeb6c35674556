"""Benchmarks behind msn-bench: the training step, the input pipeline, and the trainer end to end."""
