"""A passing fault costs a retry, never data: failure kinds (a bad file vs a failing machine), environmental
failures tried again on every run, previous embeddings kept when a re-embed fails, commits by work done
(time and audio, and on Ctrl-C), and a decoder that crashes its worker process blamed on its file."""

from __future__ import annotations

import errno
import math
import sqlite3
import tempfile
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from clapcli.errors import DATA_FAILURE, ENVIRONMENT_FAILURE, AudioDecodeError, failure_kind
from clapcli.index.indexer import IndexInterrupted, build_index
from clapcli.index.store import IndexStore
from library import committed_files


@pytest.fixture(scope="module")
def model(tiny_unfused_dir):
    from clapcli.engine.load import load_model

    return load_model(tiny_unfused_dir, device="cpu", precision="fp32")


def clips(root: Path, n: int, seconds: float = 2.0, seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(root / f"clip_{i:02d}.wav")
        write_audio(paths[-1], tone_noise(seconds, 16_000, seed=seed + i), 16_000, subtype="PCM_16")
    return paths


def file_vectors(index_dir: Path) -> dict[str, bytes]:
    """path → file-level embedding blob, read with plain SQL."""
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return dict(con.execute(
            "SELECT f.path, e.vector FROM files f JOIN segments s ON s.file_id = f.id "
            "JOIN embeddings e ON e.segment_id = s.id WHERE s.kind = 'file'").fetchall())
    finally:
        con.close()


def index(root: Path, index_dir: Path, model, **options):
    return build_index([root], index_dir, lambda name: model, batch_size=1, **options)


@pytest.fixture
def full_tmpdir(monkeypatch):
    """TMPDIR out of space: every temporary file fails with ENOSPC while `full[0]` is true (each block read
    opens one, to catch what the C decoders print)."""
    full = [False]
    real = tempfile.TemporaryFile

    def temporary_file(*args, **kwargs):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    return full


# -- failure kinds -----------------------------------------------------------------------------------------


def test_failure_kinds_tell_the_machine_from_the_file():
    assert failure_kind(OSError(errno.ENOSPC, "No space left on device")) == ENVIRONMENT_FAILURE
    assert failure_kind(OSError(errno.ESTALE, "Stale file handle")) == ENVIRONMENT_FAILURE
    assert failure_kind(PermissionError(errno.EACCES, "Permission denied")) == ENVIRONMENT_FAILURE
    assert failure_kind(MemoryError()) == ENVIRONMENT_FAILURE
    assert failure_kind(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == ENVIRONMENT_FAILURE
    assert failure_kind(RuntimeError("DefaultCPUAllocator: can't allocate memory")) == ENVIRONMENT_FAILURE
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as err:
            raise AudioDecodeError("x.wav", f"cannot be opened ({err})") from err
    except AudioDecodeError as wrapped:
        assert failure_kind(wrapped) == ENVIRONMENT_FAILURE
    assert failure_kind(AudioDecodeError("x.wav", "not a recognised audio file")) == DATA_FAILURE
    assert failure_kind(ValueError("bad segment bounds")) == DATA_FAILURE
    assert failure_kind(RuntimeError("shape mismatch")) == DATA_FAILURE


def test_a_vanished_file_is_an_environmental_failure(tmp_path):
    from clapcli.audio.decode import MonoReader

    with pytest.raises(AudioDecodeError) as caught:
        MonoReader(tmp_path / "gone.wav")
    assert caught.value.reason == "file not found" and failure_kind(caught.value) == ENVIRONMENT_FAILURE


def test_a_bad_file_is_a_data_failure_and_waits_until_it_changes(tmp_path, model):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    clips(root, 2)
    bad = root / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file" * 10)
    first = index(root, index_dir, model)
    assert first.added == 2 and first.environment_failures == 0 and first.retry_files == []
    with IndexStore.open(index_dir, readonly=True) as store:
        assert [(r.path, r.error_kind) for r in store.error_files()] == [(str(bad), DATA_FAILURE)]
    again = index(root, index_dir, model)
    assert again.unchanged == 3 and again.retried == 0 and again.skipped == []


# -- environmental failures: retried, previous embeddings kept -----------------------------------------


def test_no_space_in_tmpdir_keeps_previous_embeddings_and_is_retried(tmp_path, model, full_tmpdir):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    a, b = clips(root, 2)
    index(root, index_dir, model)
    before = file_vectors(index_dir)

    write_audio(a, tone_noise(3.0, 16_000, seed=50), 16_000, subtype="PCM_16")  # a new version of a
    new = root / "new.wav"
    write_audio(new, tone_noise(2.0, 16_000, seed=51), 16_000, subtype="PCM_16")
    full_tmpdir[0] = True
    failed = index(root, index_dir, model)
    full_tmpdir[0] = False
    assert failed.environment_failures == 2 and failed.unchanged == 1
    assert [p for p, _ in failed.kept_previous] == [str(a)] and "No space left" in failed.kept_previous[0][1]
    assert [p for p, _ in failed.retry_files] == [str(new)]
    assert failed.to_dict()["retry_next_run"] == 2
    assert file_vectors(index_dir) == before  # a's old embeddings are still there, and searchable
    with IndexStore.open(index_dir, readonly=True) as store:
        states = store.file_states()
        assert states[str(a)].status == "ok" and states[str(a)].size != a.stat().st_size
        assert states[str(new)].status == "error" and states[str(new)].error_kind == ENVIRONMENT_FAILURE

    fixed = index(root, index_dir, model)  # nothing changed on disk since: both are tried again
    assert fixed.retried == 1 and fixed.updated == 2 and fixed.unchanged == 1 and fixed.skipped == []
    assert fixed.retry_files == [] and fixed.total_files == 3
    after = file_vectors(index_dir)
    assert after[str(b)] == before[str(b)] and after[str(a)] != before[str(a)] and str(new) in after


def test_out_of_memory_in_the_forward_pass_is_retried(tmp_path, model, monkeypatch):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    clips(root, 3)
    real = model._run_jobs

    def crowded_gpu(batch, *args, **kwargs):  # another job holds the memory while clip_01 runs
        if any(job[0] == 1 for job in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(model, "_run_jobs", crowded_gpu)
    first = index(root, index_dir, model)
    monkeypatch.setattr(model, "_run_jobs", real)
    assert first.added == 2 and first.environment_failures == 1
    assert [p.rsplit("/", 1)[-1] for p, _ in first.retry_files] == ["clip_01.wav"]
    second = index(root, index_dir, model)
    assert second.retried == 1 and second.updated == 1 and second.unchanged == 2 and second.total_files == 3


def test_index_prints_what_will_be_tried_again(tmp_path, tiny_unfused_dir, full_tmpdir):
    from cli_runner import clap

    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    clips(root, 2)
    full_tmpdir[0] = True
    result = clap("index", root, "--index", index_dir, "--model", tiny_unfused_dir)
    assert "to be tried again on the next run: 2 environmental failures" in result.output
    full_tmpdir[0] = False
    result = clap("index", root, "--index", index_dir, "--model", tiny_unfused_dir)
    assert "tried 2 earlier environmental failures again" in result.output
    assert "to be tried again" not in result.output


def test_error_rows_from_before_failure_kinds_are_tried_once_more(tmp_path, monkeypatch):
    from clapcli.index import schema

    index_dir = tmp_path / "idx"
    mine = schema.MIGRATIONS.index(schema._migrate_to_4)
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:mine])
    with IndexStore.open(index_dir, create=True) as store:
        store._conn.execute("INSERT INTO files (path, size, mtime_ns, status, error, indexed_at) "
                            "VALUES ('/a.wav', 1, 1, 'error', 'OSError: [Errno 5] Input/output error', 0)")
    monkeypatch.undo()
    with IndexStore.open(index_dir) as store:
        (row,) = store.error_files()
        assert row.error_kind is None and row.retried
        store.record_error("/a.wav", 1, 1, None, "not a recognised audio file", DATA_FAILURE)
        (row,) = store.error_files()
        assert row.error_kind == DATA_FAILURE and not row.retried
        with pytest.raises(ValueError):
            store.record_error("/a.wav", 1, 1, None, "x", "cosmic rays")


# -- commits by work done ----------------------------------------------------------------------------------


def test_long_files_are_committed_by_audio_seconds(tmp_path, model):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    clips(root, 3, seconds=25.0)
    seen = []
    summary = index(root, index_dir, model, commit_every=64, commit_seconds=math.inf, commit_audio_seconds=40.0,
                    on_file=lambda result: seen.append(committed_files(index_dir)))
    assert summary.added == 3 and summary.committed == 3
    assert seen == [0, 0, 2]  # 25 s, then 50 s ≥ 40 s: the first two land in one commit


def test_long_files_are_committed_by_wall_time(tmp_path, model):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    clips(root, 3, seconds=12.0)
    seen = []
    index(root, index_dir, model, commit_every=64, commit_seconds=0.0,
          on_file=lambda result: seen.append(committed_files(index_dir)))
    assert seen == [0, 1, 2]


def test_ctrl_c_during_a_long_file_keeps_the_files_finished_before_it(tmp_path, model):
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    paths = clips(root, 4, seconds=25.0)

    def ctrl_c_in_the_third_file(path, seconds, expected):
        if path == str(paths[2]):
            raise KeyboardInterrupt

    with pytest.raises(IndexInterrupted) as caught:
        index(root, index_dir, model, commit_every=64, on_audio=ctrl_c_in_the_third_file)
    assert caught.value.message.startswith("interrupted: 2 files embedded and committed")
    assert sorted(file_vectors(index_dir)) == [str(p) for p in paths[:2]]
    rerun = index(root, index_dir, model)
    assert rerun.added == 2 and rerun.unchanged == 2


# -- a decoder that crashes its worker process --------------------------------------------------------


@pytest.mark.parametrize("signal_name, kind", [("SIGSEGV", DATA_FAILURE), ("SIGKILL", ENVIRONMENT_FAILURE)])
def test_a_worker_crash_is_blamed_on_its_file_and_the_run_goes_on(tmp_path, model, monkeypatch, signal_name, kind):
    import os
    import signal

    import torch

    from clapcli.audio import stream
    from clapcli.audio.loader import MIN_FILES_FOR_WORKERS

    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    paths = clips(root, MIN_FILES_FOR_WORKERS + 2, seconds=0.5)
    poisoned = paths[5]

    class PoisonedDecoder(stream.MonoReader):  # inherited by the forked decode workers
        def __init__(self, path, *args, **kwargs):
            if os.fspath(path) == str(poisoned) and torch.utils.data.get_worker_info() is not None:
                os.kill(os.getpid(), getattr(signal, signal_name))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(stream, "MonoReader", PoisonedDecoder)
    first = index(root, index_dir, model, workers=2)
    assert first.added == len(paths) - 1 and [p for p, _ in first.skipped] == [str(poisoned)]
    with IndexStore.open(index_dir, readonly=True) as store:
        (row,) = store.error_files()
    assert row.path == str(poisoned) and row.error_kind == kind
    assert row.error == f"the decoder crashed its worker process (killed by {signal_name})"
    again = index(root, index_dir, model, workers=2)
    assert again.retried == (kind == ENVIRONMENT_FAILURE) and again.unchanged == len(paths) - again.retried
