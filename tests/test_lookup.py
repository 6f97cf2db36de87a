"""`index.lookup.stored_file`: the stored vectors of an indexed file, by path or id, only while unchanged."""

from __future__ import annotations

import os

import numpy as np

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli.index.lookup import stored_file
from clapcli.index.store import IndexStore


def test_stored_file_gives_the_indexed_vectors_by_path_and_id_and_none_once_changed(tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    lib.mkdir()
    short, long = lib / "short.wav", lib / "long.wav"
    write_audio(short, tone_noise(1.0, seed=1), 48000)
    write_audio(long, tone_noise(25.0, seed=2), 48000)
    index = tmp_path / "idx"
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    store = IndexStore.open(index, readonly=True)
    try:
        a = stored_file(store, short)
        b = stored_file(store, long)
        assert a is not None and b is not None
        assert a.windows == [] and a.window_vectors.shape == (0, a.vector.shape[0])
        assert len(b.windows) >= 2 and b.window_vectors.shape == (len(b.windows), b.vector.shape[0])
        assert abs(float(np.linalg.norm(a.vector)) - 1.0) < 1e-4
        by_id = stored_file(store, file_id=b.record.id)
        assert by_id is not None and np.array_equal(by_id.vector, b.vector)
        assert stored_file(store, lib / "nope.wav") is None
        st = os.stat(short)
        os.utime(short, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert stored_file(store, short) is None
        assert stored_file(store, short, require_unchanged=False) is not None
    finally:
        store.close()
