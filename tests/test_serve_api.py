"""`clap serve`'s API (clapcli.serve.app) on a real small index built by the tiny model, through Starlette's
TestClient (no socket), and `clap serve` itself as a subprocess on a free port."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from starlette.testclient import TestClient

from audio_synth import tone_noise, write_audio
from cli_runner import clap, fails
from entry_point import clap_executable
from library import GOOD, make_library

from clapcli.serve.app import MAX_UPLOAD_BYTES, ServeConfig, create_app

LOCAL = "http://127.0.0.1:8765"
PICKED = [g for g in GOOD if g[0] in ("drums/kick_01.wav", "drums/snare_01.flac", "fx/whoosh_01.wav",
                                      "fx/impact_01.ogg", "ambience/city/street.wav", "voice/shout.aiff",
                                      "music/pad_c.wav")]
HIT_KEYS = {"rank", "score", "path", "start", "end", "duration", "query", "id", "name", "folder", "format",
            "sample_rate", "channels", "missing", "windows", "tags", "ranges", "mime", "transcoded"}


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """(library root, index dir) of a few synthesised files indexed with the real CLI."""
    root = tmp_path_factory.mktemp("servelib")
    make_library(root, good=PICKED)
    index = tmp_path_factory.mktemp("serveidx") / "idx"
    clap("index", root / "drums", root / "fx", root / "ambience", root / "voice", root / "music",
         "--index", index, "--model", tiny_model_dir, "--workers", "0")
    return root, index


def client(index: Path, **config) -> TestClient:
    return TestClient(create_app(ServeConfig(index, **config)), base_url=LOCAL)


@pytest.fixture
def api(built):
    with client(built[1]) as c:
        yield c


def file_id(api, name: str) -> int:
    hits = api.get("/api/search", params={"q": "anything", "k": 50}).json()["hits"]
    return next(h["id"] for h in hits if h["name"] == name)


def test_status_names_the_index_and_counts_its_files(api, built):
    status = api.get("/api/status").json()
    assert status["index"] == "idx" and status["path"] == str(built[1])
    assert status["files"] == len(PICKED) and status["segments"] > len(PICKED)  # street.wav has windows
    assert status["writing"] is False and status["labels"] == "audioset"
    assert isinstance(status["generation"], int) and isinstance(status["updated_at"], float)
    assert {"model", "version"} <= set(status)


def test_search_hits_carry_the_cli_keys_and_the_page_keys(api, built, tiny_model_dir):
    body = api.get("/api/search", params={"q": "rain on a roof - thunder", "k": 50}).json()
    assert body["query"] == {"text": ["rain on a roof"], "not": ["thunder"], "audio": [], "not_audio": []}
    hits = body["hits"]
    assert len(hits) == len(PICKED) and [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    for h in hits:
        assert set(h) == HIT_KEYS
        assert h["name"] == os.path.basename(h["path"]) and h["missing"] is False
        assert 1 <= len(h["tags"]) <= 5 and set(h["tags"][0]) == {"label", "score"}
        assert [t["score"] for t in h["tags"]] == sorted((t["score"] for t in h["tags"]), reverse=True)
    street = next(h for h in hits if h["name"] == "street.wav")
    assert street["folder"] == "ambience/city" and street["format"] == "wav"
    assert street["sample_rate"] == 22_050 and street["channels"] == 1
    assert len(street["windows"]) >= 2 and all(len(w) == 3 for w in street["windows"])
    assert [w[0] for w in street["windows"]] == sorted(w[0] for w in street["windows"])
    assert next(h for h in hits if h["name"] == "kick_01.wav")["windows"] == []
    # the same ranking as `clap search --json`
    cli = [json.loads(line) for line in clap("search", "rain on a roof", "-", "thunder", "--index", built[1],
                                             "--json", "-k", "50").stdout.splitlines()]
    assert [h["path"] for h in hits] == [h["path"] for h in cli]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in cli], abs=1e-5)


def test_empty_or_bad_queries_are_400_with_one_line(api):
    for params in ({"q": ""}, {"q": "   "}, {"q": "rain", "k": "many"}, {"q": "rain", "k": "0"}):
        r = api.get("/api/search", params=params)
        assert r.status_code == 400 and "\n" not in r.json()["error"], params


def test_similar_leaves_the_file_out_and_uses_its_stored_vector(api):
    kick = file_id(api, "kick_01.wav")
    body = api.get("/api/similar", params={"id": kick, "k": 3}).json()
    assert len(body["hits"]) == 3 and kick not in [h["id"] for h in body["hits"]]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3] and body["query"]["id"] == kick
    everything = api.get("/api/similar", params={"id": kick, "k": 50}).json()["hits"]
    assert len(everything) == len(PICKED) - 1


def test_tags_of_a_file(api):
    kick = file_id(api, "kick_01.wav")
    body = api.get("/api/tags", params={"id": kick}).json()
    assert body["id"] == kick and len(body["tags"]) == 5
    assert all(isinstance(t["label"], str) and -1 <= t["score"] <= 1 for t in body["tags"])


def test_upload_searches_by_example_and_writes_nothing_into_the_library(api, built):
    root = built[0]
    before = sorted(p.name for p in root.rglob("*"))
    kick = root / "drums" / "kick_01.wav"
    r = api.post("/api/similar-audio", files={"file": ("my kick.wav", kick.read_bytes(), "audio/wav")},
                 params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["audio"] == ["my kick.wav"]
    assert body["hits"][0]["name"] == "kick_01.wav" and body["hits"][0]["score"] > 0.99
    assert sorted(p.name for p in root.rglob("*")) == before


def test_uploads_past_the_cap_are_413_and_bad_ones_400(api):
    big = b"\0" * (MAX_UPLOAD_BYTES + (1 << 17))
    r = api.post("/api/similar-audio", files={"file": ("big.wav", big, "audio/wav")})
    assert r.status_code == 413 and "64 MiB" in r.json()["error"]
    r = api.post("/api/similar-audio", files={"file": ("noise.wav", b"not audio at all", "audio/wav")})
    assert r.status_code == 400 and "noise.wav" in r.json()["error"]
    assert api.post("/api/similar-audio", data={"other": "x"}).status_code == 400


def test_peaks_are_buckets_of_min_max_and_cached_by_content(api, built, clap_home):
    street = file_id(api, "street.wav")
    body = api.get(f"/api/peaks/{street}", params={"n": 100}).json()
    assert body["id"] == street and body["duration"] == pytest.approx(14.0, abs=0.01)
    peaks = np.array(body["peaks"])
    assert peaks.shape == (100, 2) and (peaks[:, 0] <= peaks[:, 1]).all() and np.abs(peaks).max() <= 1
    data, sr = sf.read(built[0] / "ambience/city/street.wav", dtype="float32")
    edges = np.arange(101) * len(data) // 100
    want = [[data[a:b].min(), data[a:b].max()] for a, b in zip(edges[:-1], edges[1:])]
    assert np.allclose(peaks, want, atol=2e-4)
    cached = list((clap_home / "peaks").iterdir())
    assert len(cached) == 1
    cached[0].write_text(json.dumps([[0.0, 0.5]] * 100))  # the cache answers the next request
    assert api.get(f"/api/peaks/{street}", params={"n": 100}).json()["peaks"][0] == [0.0, 0.5]


def test_map_projects_every_file_into_the_unit_square(api):
    for color in ("folder", "tag"):
        body = api.get("/api/map", params={"color": color}).json()
        n = len(PICKED)
        assert body["method"] in ("pca", "umap")
        assert all(len(body[key]) == n for key in ("ids", "x", "y", "names", "folders", "paths", "groups"))
        assert [os.path.basename(p) for p in body["paths"]] == body["names"]
        assert all(0 <= v <= 1 for v in body["x"] + body["y"])
        assert all(0 <= g < len(body["legend"]) for g in body["groups"])
    assert set(api.get("/api/map").json()["legend"]) == {"drums", "fx", "ambience", "voice", "music"}
    assert api.get("/api/map", params={"color": "mood"}).status_code == 400


def test_each_hit_says_what_its_audio_is_sent_as(api, built):
    """The page names a dragged file by this: the file itself where browsers play it, else a WAV made on the fly;
    each hit's `mime` is the content type `/api/audio/N` answers with."""
    hits = {h["name"]: h for h in api.get("/api/search", params={"q": "anything", "k": 50}).json()["hits"]}
    assert (hits["shout.aiff"]["mime"], hits["shout.aiff"]["transcoded"]) == ("audio/wav", True)
    assert (hits["impact_01.ogg"]["mime"], hits["impact_01.ogg"]["transcoded"]) == ("audio/ogg", False)
    for hit in hits.values():
        assert api.get(f"/api/audio/{hit['id']}", headers={"Range": "bytes=0-3"}).headers["content-type"] == hit["mime"]


def test_audio_is_sent_with_range_and_aiff_as_wav(api, built):
    kick = file_id(api, "kick_01.wav")
    raw = (built[0] / "drums/kick_01.wav").read_bytes()
    r = api.get(f"/api/audio/{kick}")
    assert r.status_code == 200 and r.content == raw and r.headers["content-type"] == "audio/wav"
    r = api.get(f"/api/audio/{kick}", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == raw[100:200]
    shout = file_id(api, "shout.aiff")
    r = api.get(f"/api/audio/{shout}")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    got, sr = sf.read(io.BytesIO(r.content), dtype="int16")
    want, want_sr = sf.read(built[0] / "voice/shout.aiff", dtype="int16")
    assert sr == want_sr and np.array_equal(got, want)
    whole = r.content
    assert r.headers["accept-ranges"] == "bytes"
    for first, last in ((0, 9), (40, 47), (44, 44), (1001, 30_000), (len(whole) - 7, len(whole) - 1)):
        part = api.get(f"/api/audio/{shout}", headers={"Range": f"bytes={first}-{last}"})
        assert part.status_code == 206 and part.content == whole[first : last + 1], (first, last)
        assert part.headers["content-range"] == f"bytes {first}-{last}/{len(whole)}"
    assert api.get(f"/api/audio/{shout}", headers={"Range": "bytes=-5"}).content == whole[-5:]
    assert api.get(f"/api/audio/{shout}", headers={"Range": f"bytes={len(whole)}-"}).status_code == 416


def test_unknown_and_path_like_ids_are_404(api):
    for url in ("/api/audio/999999", "/api/peaks/999999", "/api/audio/..%2F..%2Fetc%2Fpasswd",
                "/api/audio/%2e%2e%2fstatus", "/api/audio/-1", "/api/audio/1.wav", "/api/nothing"):
        r = api.get(url)
        assert r.status_code == 404 and "error" in r.json(), url
    for url in ("/api/tags?id=999999", "/api/similar?id=999999", "/api/tags?id=../1"):
        assert api.get(url).status_code == 404, url


def test_a_file_turned_into_a_symlink_out_of_the_roots_is_refused(tiny_model_dir, tmp_path):
    root, outside = tmp_path / "lib", tmp_path / "secret"
    root.mkdir(), outside.mkdir()
    write_audio(root / "a.wav", tone_noise(1.0, seed=1), 48_000)
    write_audio(root / "b.wav", tone_noise(1.0, seed=2), 48_000)
    write_audio(outside / "private.wav", tone_noise(1.0, seed=3), 48_000)
    index = tmp_path / "idx"
    clap("index", root, "--index", index, "--model", tiny_model_dir, "--workers", "0")
    (root / "a.wav").unlink()
    (root / "a.wav").symlink_to(outside / "private.wav")
    (root / "b.wav").unlink()
    with client(index) as api:
        hits = {h["name"]: h for h in api.get("/api/search", params={"q": "x"}).json()["hits"]}
        assert hits["b.wav"]["missing"] is True
        r = api.get(f"/api/audio/{hits['a.wav']['id']}")
        assert r.status_code == 403 and "outside" in r.json()["error"]
        assert api.get(f"/api/peaks/{hits['a.wav']['id']}").status_code == 403
        assert api.get(f"/api/audio/{hits['b.wav']['id']}").status_code == 404


def test_other_origins_and_hosts_are_refused(api):
    assert api.get("/api/status", headers={"Origin": LOCAL}).status_code == 200
    assert api.get("/api/status", headers={"Origin": "http://localhost:8765"}).status_code == 403
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        r = api.get("/api/status", headers={"Origin": origin})
        assert r.status_code == 403 and "other sites" in r.json()["error"], origin
    for host in ("evil.example:8765", "127.0.0.1.evil.example", ""):
        assert api.get("/api/status", headers={"Host": host}).status_code == 403, host
    for host in ("localhost:8765", "[::1]:8765", "127.0.0.1"):
        assert api.get("/api/status", headers={"Host": host}).status_code == 200, host


def test_a_token_is_needed_on_every_request_when_set(built):
    with TestClient(create_app(ServeConfig(built[1], host="0.0.0.0", token="s3cret")),
                    base_url="http://192.168.1.5:8765") as api:
        for url in ("/", "/api/status", "/api/search?q=rain", "/api/audio/1"):
            r = api.get(url)
            assert r.status_code == 403 and "token" in r.json()["error"], url
        assert api.get("/api/status", params={"token": "wrong"}).status_code == 403
        assert api.get("/api/status", params={"token": "s3cret"}).status_code == 200
        assert api.get("/api/status", headers={"X-Clap-Token": "s3cret"}).status_code == 200
        assert api.get("/", params={"token": "s3cret"}).status_code == 200
        assert api.get("/static/app.js").status_code != 403  # the page's own files: its module imports carry no token
        assert api.get("/static/app.js", headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_new_commit_by_clap_index_is_noticed_without_restart(tiny_model_dir, tmp_path):
    from clapcli.index.lock import WriterLock

    root = tmp_path / "lib"
    root.mkdir()
    write_audio(root / "a.wav", tone_noise(1.0, seed=1), 48_000)
    index = tmp_path / "idx"
    clap("index", root, "--index", index, "--model", tiny_model_dir, "--workers", "0")
    with client(index) as api:
        first = api.get("/api/status").json()
        assert first["files"] == 1 and len(api.get("/api/search", params={"q": "x"}).json()["hits"]) == 1
        api.get("/api/map")
        with WriterLock(index):
            assert api.get("/api/status").json()["writing"] is True
        write_audio(root / "b.wav", tone_noise(2.0, seed=2), 48_000)
        clap("index", root, "--index", index, "--workers", "0")
        status = api.get("/api/status").json()
        assert status["files"] == 2 and status["generation"] > first["generation"] and status["writing"] is False
        assert {h["name"] for h in api.get("/api/search", params={"q": "x"}).json()["hits"]} == {"a.wav", "b.wav"}
        assert len(api.get("/api/map").json()["ids"]) == 2


def test_cli_errors_are_one_line(tmp_path, built):
    fails("serve", "--index", tmp_path / "nope", code=1, match="no index at")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        out = subprocess.run([clap_executable(), "serve", "--index", str(built[1]), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: the port is in use; pass another " \
                                 "--port (0: any free one)"


def test_a_missing_extra_names_its_pip_line(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    fails("serve", "--index", built[1], code=1, match="pip install 'clapcli[serve]'")


def test_clap_serve_answers_over_http_and_stops_on_sigint(built):
    proc = subprocess.Popen([clap_executable(), "serve", "--index", str(built[1]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "api/status", timeout=30) as r:
                    status = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert status["files"] == len(PICKED)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stderr.read()


def three_file_index(tmp_path, model_dir):
    """An index of three 1 s clips, built by `clap index` with the tiny model."""
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(3):
        write_audio(root / f"{i}.wav", tone_noise(1.0, seed=i), 48_000)
    index = tmp_path / "idx"
    clap("index", root, "--index", index, "--model", model_dir, "--workers", "0")
    return index


def test_a_read_only_index_is_served_without_writing(tiny_model_dir, tmp_path):
    from test_index_safety import _read_only_command

    index = three_file_index(tmp_path, tiny_model_dir)
    listing = sorted(os.listdir(index))
    script = ("import json, sys; from starlette.testclient import TestClient; "
              "from clapcli.serve.app import ServeConfig, create_app; "
              "api = TestClient(create_app(ServeConfig(sys.argv[1])), base_url='http://127.0.0.1:8765'); "
              "api.__enter__(); "
              "print(json.dumps([api.get('/api/status').json(), api.get('/api/search', params={'q': 'dog'}).json(), "
              "api.get('/api/map').status_code])); api.__exit__(None, None, None)")
    argv = [sys.executable, "-c", script, str(index)]
    try:
        proc = subprocess.run(_read_only_command(index, argv), capture_output=True, text=True, timeout=300)
    finally:
        index.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    status, found, map_status = json.loads(proc.stdout)
    assert status["files"] == 3 and len(found["hits"]) == 3 and map_status == 200
    assert sorted(os.listdir(index)) == listing


def test_off_loopback_clap_serve_makes_up_a_token_and_prints_it(built):
    proc = subprocess.Popen([clap_executable(), "serve", "--index", str(built[1]), "--host", "0.0.0.0", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0]
        base, token = url.split("?token=")
        assert len(token) >= 24
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/status", timeout=60)
        assert refused.value.code == 403
        with urllib.request.urlopen(f"{base}api/status?token={token}", timeout=60) as r:
            assert json.loads(r.read())["files"] == len(PICKED)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_a_server_bound_to_one_address_answers_to_it_and_loopback_only(built):
    app = create_app(ServeConfig(built[1], host="10.1.2.3", token="t"))
    with TestClient(app, base_url="http://10.1.2.3:8765") as api:
        assert api.get("/api/status", params={"token": "t"}).status_code == 200
        assert api.get("/api/status", params={"token": "t"}, headers={"Host": "evil.example:8765"}).status_code == 403
        assert api.get("/api/status", params={"token": "t"}, headers={"Host": "localhost:8765"}).status_code == 200
    with TestClient(create_app(ServeConfig(built[1], host="::1")), base_url="http://[::1]:8765") as api:
        assert api.get("/api/status").status_code == 200
        assert api.get("/api/status", headers={"Origin": "http://[::1]:8765"}).status_code == 200
        assert api.get("/api/status", headers={"Host": "evil.example"}).status_code == 403


def test_the_server_never_writes_the_graph_of_a_writable_index(tiny_model_dir, tmp_path, monkeypatch):
    """`clap search` refreshes a stale saved graph when it can; the server keeps its refreshed graph in memory."""
    import clapcli.index.ann as ann
    from starlette.testclient import TestClient

    from clapcli.serve.app import ServeConfig, create_app

    index = three_file_index(tmp_path, tiny_model_dir)
    monkeypatch.setattr(ann, "EXACT_BELOW", 0)  # a graph even for three files
    for name in os.listdir(index):
        if name.startswith("vectors."):
            os.remove(index / name)
    listing = sorted(os.listdir(index))
    with TestClient(create_app(ServeConfig(str(index))), base_url="http://127.0.0.1:8765") as api:
        assert len(api.get("/api/search", params={"q": "dog"}).json()["hits"]) == 3
    # (SQLite's -wal/-shm are the WAL readers' shared memory, which any reader of a writable index maps)
    assert sorted(n for n in os.listdir(index) if not n.endswith(("-wal", "-shm"))) == listing
