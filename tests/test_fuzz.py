"""Bounded fuzzing of what reads untrusted bytes: the audio decoder and the shard reader.

Random bytes and mutated real files (WAV, FLAC, OGG, MP3 written here; tar shards written by ShardWriter)
must each give a result or a clear clapcli error (a `ClapError`: `AudioDecodeError`, `DataError`, with a
one-line message), never another exception, a crash or a hang. Every input runs in a forked worker with a
time limit, so a hang or a crash in native code (libsndfile, mpg123) is reported as such instead of
stopping the test run; the worker is replaced after either.

The default run is small and derandomized (the same inputs every time, ~20 s); `pytest -m slow
tests/test_fuzz.py` runs ten times as many random examples. Inputs that once failed are kept below as
regression tests.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import struct
import tarfile
import tempfile
import traceback

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional  # noqa: F401 - imported once here, not in every new worker (resampling)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from audio_synth import tone_noise
from clapcli.audio.decode import load_audio, probe, read_mono
from clapcli.errors import ClapError
from clapcli.data.shard_writer import ShardWriter, encode_flac
from clapcli.data.shards import decode_audio, iter_shard, select_text

TIMEOUT_S = 20.0  # per input: far above any decode of these few-kB files, even on a loaded machine

DEFAULT = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                   phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a finding is reported unshrunk
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=600, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------
# The targets, as the worker runs them


def _call(fn, *args) -> str:
    """'ok', or 'ClapError subclass: message'; any other exception propagates (a finding)."""
    try:
        fn(*args)
        return "ok"
    except ClapError as exc:
        message = str(exc)
        if "\n" in message or not message.strip():
            raise AssertionError(f"{type(exc).__name__} without a one-line message: {message!r}") from exc
        return f"{type(exc).__name__}: {message}"


def _decode_file(path: str) -> list[str]:
    def loaded():
        wave = load_audio(path)
        assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) > 0, (wave.dtype, wave.shape)
        assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0

    def mono():
        samples, info = read_mono(path)
        assert samples.ndim == 1 and len(samples) > 0 and info.sample_rate > 0 and info.channels > 0

    return [_call(probe, path), _call(mono), _call(loaded)]


def _read_shard(path: str) -> list[str]:
    outcomes = []

    def read_all():
        for raw in iter_shard(path):
            outcomes.append(_call(decode_audio, raw))
            select_text(raw.meta)

    outcomes.insert(0, _call(read_all))
    return outcomes


TARGETS = {"audio": _decode_file, "shard": _read_shard}


def _serve(conn) -> None:
    # A forked child of a process whose OpenMP pool has run hangs in its first parallel region (libgomp is
    # not fork-safe): in the full suite, earlier tests have used the pool. One thread runs torch inline, as
    # in DataLoader workers.
    torch.set_num_threads(1)
    directory = tempfile.mkdtemp(prefix="clap-fuzz-")
    while True:
        try:
            target, data, suffix = conn.recv()
        except EOFError:
            return
        path = os.path.join(directory, "input" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            conn.send(("ok", TARGETS[target](path)))
        except BaseException:  # noqa: BLE001 - the finding, sent back whole
            conn.send(("error", traceback.format_exc()))


class Sandbox:
    """A forked worker that runs one target on one input at a time, within `timeout` seconds."""

    def __init__(self, timeout: float = TIMEOUT_S):
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> int | None:
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.conn.close()
        self._start()
        return code

    def run(self, target: str, data: bytes, suffix: str) -> tuple[str, object]:
        """("ok", outcomes) | ("error", traceback) | ("hang", why) | ("crash", why)."""
        self.conn.send((target, data, suffix))
        if not self.conn.poll(self.timeout):
            self._restart()
            return "hang", f"no answer within {self.timeout:g} s"
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join(5)
            code = self.proc.exitcode
            self._restart()
            return "crash", f"the worker died (exit code {code})"

    def close(self) -> None:
        self.proc.kill()  # it waits for the next input (its copy of our end keeps its pipe open)
        self.proc.join()
        self.conn.close()


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def check(sandbox: Sandbox, target: str, data: bytes, suffix: str) -> list[str]:
    status, detail = sandbox.run(target, data, suffix)
    assert status == "ok", f"{status} on {len(data)} bytes ({suffix}): {detail}\ninput: {data[:200]!r}…"
    return detail


# ---------------------------------------------------------------------------------------------------------
# Seeds: small real files, made here


def _encode(fmt: str, subtype: str | None, seconds: float, sr: int, channels: int, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone_noise(seconds, sr, channels=channels, seed=seed), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


AUDIO_SEEDS = {
    ".wav": _encode("WAV", "PCM_16", 0.05, 44_100, 2, 1),
    ".flac": _encode("FLAC", "PCM_16", 0.08, 48_000, 1, 2),
    ".ogg": _encode("OGG", "VORBIS", 0.1, 22_050, 1, 3),
    ".mp3": _encode("MP3", "MPEG_LAYER_III", 0.1, 44_100, 1, 4),
    ".f32.wav": _encode("WAV", "FLOAT", 0.03, 16_000, 1, 5),
}


def _shard_seed() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        writer = ShardWriter(directory, shard_size=8)
        for i in range(2):
            audio = encode_flac(tone_noise(0.05, 48_000, seed=10 + i))
            writer.add(f"{i:06d}_clip", audio, {"text": [f"caption {i}", "another"], "tag": ["a"], "duration": 0.05})
        writer.close()
        with open(os.path.join(directory, "000000.tar"), "rb") as f:
            return f.read()


SHARD_SEED = _shard_seed()

INTERESTING_U32 = [0, 1, 2, 255, 1024, 65535, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 48_000]


@st.composite
def mutations(draw, seed: bytes) -> bytes:
    """`seed` with 1–4 edits: bit flips, bytes, header-sized integers, truncation, insertions, deletions;
    half of the positions fall in the first 64 bytes, where the headers are."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        top = max(len(data) - 1, 0)
        pos = draw(st.one_of(st.integers(0, min(63, top)), st.integers(0, top)))
        op = draw(st.sampled_from(["flip", "byte", "u32", "truncate", "insert", "delete"]))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "u32":
            value = draw(st.sampled_from(INTERESTING_U32))
            data[pos:pos + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), value)
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 256))]
    return bytes(data)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "tag", "x"]), inner,
                                                                  max_size=3),
    max_leaves=6,
)


@st.composite
def shard_members(draw) -> bytes:
    """A well-formed tar whose members are not: audio bytes mutated or random, JSON of any shape or not
    JSON at all, odd names, missing or repeated members."""
    members = []
    for i in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([f"{i:06d}_clip", f"dir/{i}", ".hidden", f"k{i}.a", ""]))
        ext = draw(st.sampled_from(["flac", "wav", "mp3", "ogg", "txt"]))
        seed = AUDIO_SEEDS[".flac" if ext in ("flac", "txt") else f".{ext}"]
        audio = draw(st.one_of(st.just(seed), mutations(seed), st.binary(max_size=256)))
        meta = draw(st.one_of(
            JSON_VALUES.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=64),
            st.just(b'{"text": "a dog barks"}'),
        ))
        pair = [(f"{key}.{ext}", audio), (f"{key}.json", meta)]
        members.extend(draw(st.sampled_from([pair, pair[::-1], pair[:1], pair[1:], pair + pair[:1]])))
    return _tar(members)


# ---------------------------------------------------------------------------------------------------------
# The runs


SUFFIXES = [".wav", ".flac", ".ogg", ".mp3", ".aiff"]


def _random_bytes(sandbox, data, suffix):
    check(sandbox, "audio", data, suffix)


def _mutated_audio(sandbox, pick):
    suffix, data = pick
    check(sandbox, "audio", data, suffix.replace(".f32", ""))


def _mutated_shard(sandbox, data):
    check(sandbox, "shard", data, ".tar")


MUTATED_AUDIO = st.sampled_from(sorted(AUDIO_SEEDS)).flatmap(
    lambda s: st.tuples(st.just(s), mutations(AUDIO_SEEDS[s])))
RANDOM_AUDIO = (st.binary(max_size=2048), st.sampled_from(SUFFIXES))


@DEFAULT
@given(*RANDOM_AUDIO)
def test_random_bytes_decode_or_fail_clearly(sandbox, data, suffix):
    _random_bytes(sandbox, data, suffix)


@settings(DEFAULT, max_examples=200)
@given(MUTATED_AUDIO)
def test_mutated_audio_files_decode_or_fail_clearly(sandbox, pick):
    _mutated_audio(sandbox, pick)


@settings(DEFAULT, max_examples=80)
@given(mutations(SHARD_SEED))
def test_mutated_shards_read_or_fail_clearly(sandbox, data):
    _mutated_shard(sandbox, data)


@settings(DEFAULT, max_examples=100)
@given(shard_members())
def test_shards_with_odd_members_read_or_fail_clearly(sandbox, data):
    _mutated_shard(sandbox, data)


@pytest.mark.slow
@LONG
@given(*RANDOM_AUDIO)
def test_random_bytes_long_run(sandbox, data, suffix):
    _random_bytes(sandbox, data, suffix)


@pytest.mark.slow
@settings(LONG, max_examples=2000)
@given(MUTATED_AUDIO)
def test_mutated_audio_long_run(sandbox, pick):
    _mutated_audio(sandbox, pick)


@pytest.mark.slow
@settings(LONG, max_examples=1000)
@given(mutations(SHARD_SEED))
def test_mutated_shards_long_run(sandbox, data):
    _mutated_shard(sandbox, data)


@pytest.mark.slow
@settings(LONG, max_examples=1000)
@given(shard_members())
def test_shards_with_odd_members_long_run(sandbox, data):
    _mutated_shard(sandbox, data)


def test_the_seeds_decode_and_the_sandbox_reports_hangs_and_crashes(sandbox):
    """The harness itself: real files decode ("ok" on every call), a hang and a crash are caught."""
    for suffix, data in AUDIO_SEEDS.items():
        assert check(sandbox, "audio", data, suffix.replace(".f32", "")) == ["ok", "ok", "ok"], suffix
    assert check(sandbox, "shard", SHARD_SEED, ".tar") == ["ok", "ok", "ok"]
    assert "AudioDecodeError" in check(sandbox, "audio", b"RIFF", ".wav")[0]

    short = Sandbox(timeout=1.0)
    try:
        TARGETS["sleep"] = lambda path: __import__("time").sleep(30)  # inherited by the forked worker
        short._restart()
        assert short.run("sleep", b"", ".bin")[0] == "hang"
        TARGETS["die"] = lambda path: os._exit(3)
        short._restart()
        assert short.run("die", b"", ".bin") == ("crash", "the worker died (exit code 3)")
        short.timeout = TIMEOUT_S
        assert short.run("audio", AUDIO_SEEDS[".wav"], ".wav") == ("ok", ["ok", "ok", "ok"])  # restarted
    finally:
        TARGETS.pop("sleep", None)
        TARGETS.pop("die", None)
        short.close()


# ---------------------------------------------------------------------------------------------------------
# Regressions: inputs the fuzzer found


def _with_rate(wav: bytes, rate: int) -> bytes:
    """A WAV whose header claims another sample rate (the fmt chunk's rate field, at byte 24)."""
    data = bytearray(wav)
    struct.pack_into("<I", data, 24, rate)
    return bytes(data)


def test_a_rate_prime_to_48k_resamples_quickly(sandbox, tmp_path):
    """Found by the long run: a float WAV whose rate field read 16001 Hz hung (torchaudio built a 48000 ×
    16015 sinc kernel: gigabytes, minutes). It is now resampled as 16000 Hz."""
    assert check(sandbox, "audio", _with_rate(AUDIO_SEEDS[".f32.wav"], 16_001), ".wav") == ["ok", "ok", "ok"]
    for rate in (11_127, 44_101, 47_999):
        wav = _encode("WAV", "PCM_16", 0.05, rate, 1, 6)
        assert check(sandbox, "audio", wav, ".wav") == ["ok", "ok", "ok"], rate
        (tmp_path / "a.wav").write_bytes(wav)
        expected = int(round(0.05 * rate)) * 48_000 / rate  # samples at 48 kHz: the length is kept within 0.1%
        assert abs(len(load_audio(tmp_path / "a.wav")) - expected) < 0.001 * expected


def test_rates_no_audio_has_are_refused(sandbox):
    for rate in (1, 999, 768_001, 0x7FFFFFFF):
        outcomes = check(sandbox, "audio", _with_rate(AUDIO_SEEDS[".wav"], rate), ".wav")
        assert all(o.startswith("AudioDecodeError") and f"unsupported sample rate {rate} Hz" in o
                   for o in outcomes), (rate, outcomes)
    shard = _tar([("000000_a.wav", _with_rate(AUDIO_SEEDS[".wav"], 3)), ("000000_a.json", b'{"text": "x"}'),
                  ("000001_b.flac", _encode("FLAC", "PCM_16", 0.05, 48_001, 1, 7)),
                  ("000001_b.json", b'{"text": "y"}')])
    outcomes = check(sandbox, "shard", shard, ".tar")
    assert outcomes[0] == "ok" and outcomes[2] == "ok", outcomes
    assert outcomes[1].startswith("DataError") and "unsupported sample rate 3 Hz" in outcomes[1], outcomes
