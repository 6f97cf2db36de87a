"""Evaluation: `clap eval`'s retrieval and zero-shot protocols (`evaluate`) and the metrics they, validation
during training and `clap finetune` report (`metrics`).

Nothing is imported here, so `import clapcli.eval` stays cheap; import the submodules you need.
"""
