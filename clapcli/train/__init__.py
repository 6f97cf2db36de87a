"""Training: webdataset shards, captions from tags, and (elsewhere in this package) the training loop.

Nothing is imported here, so `import clapcli.train` stays cheap; import the submodules you need.
"""
