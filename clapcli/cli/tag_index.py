"""`clap tag --index I`: tag every file of an index from its stored vectors and store the top labels in it; and the
part of `clap index` that tags the files it added (`tag_new_files`). The work is `clapcli.library.tags`'."""

from __future__ import annotations

from . import options, output


def tag_index(index: str, labels: str | None, classifier: str | None, template: list[str] | None, top_k: int,
              model: str | None, device: str, precision: str, engine: str | None, tokenizer: str | None,
              batch_size: int, as_json: bool) -> int:
    """Tag the index's files with a zero-shot label set or a classifier head; returns how many files failed."""
    from ..errors import IndexStoreError, UsageError
    from ..index.indexer import LOCK_GRACE_SECONDS
    from ..index.lock import WriterLock
    from ..index.paths import check_remembered_model, resolve_index
    from ..index.search import moved_model_advice
    from ..index.store import IndexStore
    from ..library import tags

    index_dir = resolve_index(index)
    if not IndexStore.exists(index_dir):
        raise IndexStoreError(f"no index at {index_dir}; build one with `clap index DIR`")
    head = labelset = templates = None
    if classifier is not None:
        from ..models.classifier import read_classifier

        if labels is not None or template:
            raise UsageError("--classifier brings its own labels: drop --labels and --template")
        head = read_classifier(classifier)  # a wrong directory fails before anything else
    else:
        from ..tagging import resolve_labels
        from ..tagging.prompts import check_templates

        if labels is None:
            raise UsageError("choose a label set with --labels (or a head with --classifier) to tag the index with")
        labelset, templates = resolve_labels(labels), check_templates(template)
    with WriterLock(index_dir, wait=True, timeout=LOCK_GRACE_SECONDS, holder="`clap tag --index`"):
        with IndexStore.open(index_dir) as store:
            if store.counts().embeddings == 0:
                raise IndexStoreError(f"index {index_dir} is empty; add files with `clap index DIR --index {index}`")
            if head is not None:
                tag_set = tags.classifier_tag_set(store, head, top_k)
                embed_raw = _audio_embedder(store, head, model, device, precision, engine, batch_size)
            else:
                ref = (store.model_identity or {}).get("model")
                if model is None:
                    check_remembered_model(ref, index_dir, moved_model_advice(index))
                text_model = options.load(model or ref, device, precision, tokenizer, text_only=True, engine=engine)
                tag_set, embed_raw = tags.zero_shot_tag_set(store, text_model, labelset, templates, top_k), None
            total = store.counts().ok_files
            with output.ProgressBar("tagging", total) as bar:
                run = tags.tag_index(store, tag_set, classifier=head, embed_raw=embed_raw,
                                     on_files=lambda n: [bar.advance() for _ in range(n)])
    if as_json:
        output.json_line({"index": str(index_dir), **run.to_dict()})
    else:
        _print_run(run, str(index_dir))
    return len(run.failed)


def forget_tag_set(index: str, choice: str, as_json: bool) -> None:
    """`clap tag --index I --forget SET`: drop the tag sets SET names (an id, or a name) with their tags."""
    from ..errors import IndexStoreError
    from ..index.indexer import LOCK_GRACE_SECONDS
    from ..index.lock import WriterLock
    from ..index.paths import resolve_index
    from ..index.store import IndexStore
    from ..index.tag_store import choose_tag_sets
    from ..index.tag_store import forget_tag_set as forget

    index_dir = resolve_index(index)
    if not IndexStore.exists(index_dir):
        raise IndexStoreError(f"no index at {index_dir}; build one with `clap index DIR`")
    with WriterLock(index_dir, wait=True, timeout=LOCK_GRACE_SECONDS, holder="`clap tag --forget`"):
        with IndexStore.open(index_dir) as store:
            for tag_set in choose_tag_sets(store, choice):
                files = forget(store, tag_set.id)
                if as_json:
                    output.json_line({"index": str(index_dir), "forgot": tag_set.to_dict(), "files": files})
                else:
                    output.stderr_console().print(
                        f"forgot tag set {tag_set.id} ({output.literal(tag_set.name)}) of "
                        f"{output.literal(str(index_dir))} with the tags of {output.plural(files, 'file')}",
                        highlight=False, soft_wrap=True)


def _audio_embedder(store, head, model, device, precision, engine, batch_size):
    """`embed_raw` for the files stored without norms: loads the head's model on first use and embeds those files
    (unchanged since they were indexed) to raw projection outputs."""
    from ..engine.load import load_classifier
    from ..index.lookup import unchanged_on_disk

    def embed_raw(paths: list[str]):
        current = []
        for path in paths:
            record = store.file_record(path)
            if record is None or not unchanged_on_disk(record):
                yield path, None, "changed or gone since it was indexed; run `clap index` first"
            else:
                current.append(path)
        if not current:
            return
        clap_model = options.load(model, device, precision, engine=engine) if model else None
        loaded = load_classifier(head.directory, model=clap_model, device=device, precision=precision, engine=engine)
        for e in loaded.model.embed_files(current, batch_size=batch_size, segments=False, normalize=False):
            yield e.path, (None if e.error is not None else e.embedding), e.error

    return embed_raw


def _print_run(run, index: str) -> None:
    con = output.stderr_console()
    s = run.tag_set
    how = "zero-shot" if s.kind == "zero-shot" else "classifier"
    embedded = f" ({run.embedded} embedded again: indexed without the norms a head reads)" if run.embedded else ""
    con.print(f"tagged {output.plural(run.tagged, 'file')} of {output.literal(index)} with {output.literal(s.name)} "
              f"({how}, top {s.top_k}; tag set {s.id}){embedded} in {run.seconds:.1f} s", highlight=False,
              soft_wrap=True)
    for path, reason in run.failed[:20]:
        con.print(f"  [yellow]skipped[/] {output.literal(path)}: {output.literal(reason)}", highlight=False,
                  soft_wrap=True)
    if len(run.failed) > 20:
        con.print(f"  … and {len(run.failed) - 20} more (see --json)", highlight=False)


def tag_sets_before(index_dir) -> list:
    """The tag sets of an index about to be rebuilt, for `tag_new_files(carried=…)`; [] where it has none or its
    database cannot be read (a damaged one is what --rebuild is for)."""
    import sqlite3

    from ..errors import ClapError
    from ..index.store import IndexStore
    from ..index.tag_store import tag_sets

    if not IndexStore.exists(index_dir):
        return []
    try:
        with IndexStore.open(index_dir, readonly=True) as store:
            return tag_sets(store)
    except (ClapError, sqlite3.Error):
        return []


def tag_new_files(index_dir, as_json: bool, carried: list | None = None) -> list[dict]:
    """After `clap index`: tag the files it added or embedded again in every tag set the index holds (from their
    stored vectors: no model is loaded). `carried`: the sets of the index a --rebuild replaced, added again first
    (those of the same model). Returns the runs for the summary's --json; prints them otherwise."""
    from ..index.indexer import LOCK_GRACE_SECONDS
    from ..index.lock import WriterLock
    from ..index.store import IndexStore
    from ..index.tag_store import tag_sets
    from ..library.tags import restore_tag_sets
    from ..library.tags import tag_new_files as tag_new

    if not IndexStore.exists(index_dir):
        return []
    # A look without the writer lock (an index without tags must not wait for another writer), through a writable
    # connection: its close checkpoints, so the index is left as `clap index` leaves it (no -wal, no -shm).
    with IndexStore.open(index_dir) as store:
        if not tag_sets(store) and not carried:
            return []
    with WriterLock(index_dir, wait=True, timeout=LOCK_GRACE_SECONDS, holder="`clap index` tagging new files"):
        with IndexStore.open(index_dir) as store:
            if carried:
                restore_tag_sets(store, carried)
            runs = tag_new(store)
    if not as_json:
        con = output.stderr_console()
        for run in runs:
            if run.tagged:
                con.print(f"tagged {output.plural(run.tagged, 'new file')} with {output.literal(run.tag_set.name)} "
                          f"(tag set {run.tag_set.id})", highlight=False)
            for path, reason in run.failed:
                con.print(f"[yellow]could not tag with tag set {run.tag_set.id}:[/] {output.literal(reason)}",
                          highlight=False, soft_wrap=True)
            if run.needs_audio:
                con.print(f"[yellow]{output.plural(len(run.needs_audio), 'file')} not tagged with "
                          f"{output.literal(run.tag_set.name)}[/]: indexed without the norms its head reads; "
                          f"`clap tag --index … --classifier {output.literal(run.tag_set.classifier)}` embeds them",
                          highlight=False, soft_wrap=True)
    return [{"set": run.tag_set.id, "name": run.tag_set.name, "tagged": run.tagged,
             "needs_audio": len(run.needs_audio), "failed": [{"path": p, "error": e} for p, e in run.failed]}
            for run in runs]
