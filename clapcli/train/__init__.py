"""Training: the contrastive loop (`clap train`, `loop.py`) with its data stream, loss, objectives, checkpoints
and run log, and `clap finetune` (`finetune.py`: the classifier probe on cached embeddings, or the whole model).
Dataset tooling is in `clapcli.data`, evaluation in `clapcli.eval`.

Nothing is imported here, so `import clapcli.train` stays cheap; import the submodules you need.
"""
