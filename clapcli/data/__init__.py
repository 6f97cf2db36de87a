"""Dataset tooling: the webdataset shard format (`shards`: reading; `shard_info`: `clap shards info`;
`sources` and `shard_writer`: `clap shards make`), captions from tags (`captions`), labelled audio
(`labelled`), and the one CSV/JSONL manifest reader all of them use (`manifest`).

Nothing is imported here, so `import clapcli.data` stays cheap; import the submodules you need.
"""
