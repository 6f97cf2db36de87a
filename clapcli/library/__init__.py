"""Organising an indexed library: groups of files that hold the same recording (`clap dedupe`) and tags
stored in the index (`clap tag --index`, `clap search --tag`), computed from the stored vectors."""
