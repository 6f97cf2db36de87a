"""Nothing lost: `clap index` and `clap search` never lose an index to a mistyped flag, an unmounted drive,
a failed model load, a damaged database, a read-only mount or a killed run. All through the real CLI."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import shlex
import sys
from pathlib import Path

import pytest

from cli_runner import clap
from library import GOOD, committed_files, make_library, stored, summary

def hits(index_dir: Path, query: str = "dog") -> list[str]:
    out = clap("search", query, "--index", index_dir, "--paths", "-k", "50").stdout
    return out.split()


def small_library(root: Path, n: int = 3) -> Path:
    make_library(root, good=GOOD[:n])
    shutil.rmtree(root / "broken")
    return root


# -- 1. --rebuild builds beside the old index ------------------------------------------------------------


def test_rebuild_with_a_mistyped_model_leaves_the_index_intact_and_searchable(tiny_model_dir, tmp_path):
    root, index_dir = small_library(tmp_path / "lib"), tmp_path / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir)
    before, found = stored(index_dir), hits(index_dir)
    assert len(before) == 3 and len(found) == 3

    result = clap("index", root, "--index", index_dir, "--rebuild", "--model", tmp_path / "no-such-model", ok=False)
    assert result.exit_code == 1
    assert stored(index_dir) == before
    assert hits(index_dir) == found


def test_rebuild_without_model_reuses_the_index_model_and_builds_afresh(tiny_model_dir, tmp_path):
    root, index_dir = small_library(tmp_path / "lib"), tmp_path / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir)
    con = sqlite3.connect(index_dir / "index.sqlite")
    con.execute("UPDATE files SET content_hash = 'stale'")  # marks rows from before the rebuild
    con.commit()
    con.close()

    # HF_HUB_OFFLINE is set: falling back to the default hub model would fail the run.
    s = summary(clap("index", root, "--index", index_dir, "--rebuild", "--json"))
    assert s["added"] == 3 and s["total_files"] == 3 and s["model"] == str(tiny_model_dir)
    con = sqlite3.connect(index_dir / "index.sqlite")
    assert con.execute("SELECT count(*) FROM files WHERE content_hash = 'stale'").fetchone()[0] == 0
    con.close()
    assert not (index_dir / ".rebuild").exists()
    assert len(hits(index_dir)) == 3


def test_rebuild_switches_models(tiny_model_dir, tiny_unfused_dir, tmp_path):
    root, index_dir = small_library(tmp_path / "lib", 2), tmp_path / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)
    s = summary(clap("index", root, "--index", index_dir, "--rebuild", "--model", tiny_unfused_dir, "--json"))
    assert s["model"] == str(tiny_unfused_dir) and s["total_files"] == 2
    after = stored(index_dir)
    assert sorted(after) == sorted(before) and all(after[p] != before[p] for p in after)
    assert len(hits(index_dir)) == 2  # search picks up the new model from the index


# -- 2. a folder that now lists nothing prunes nothing ------------------------------------------------------


def test_emptied_folder_prunes_nothing_without_prune_empty(tiny_model_dir, tmp_path):
    mount, other = tmp_path / "mnt" / "drive", tmp_path / "lib"
    small_library(mount, 3)
    small_library(other, 1)
    index_dir = tmp_path / "idx"
    clap("index", mount, other, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)
    assert len(before) == 4

    shutil.rmtree(mount)  # the drive is unmounted: its mount point is an empty folder
    mount.mkdir()
    (other / "new").mkdir()
    shutil.copy(other / GOOD[0][0], other / "new" / "copy.wav")
    result = clap("index", mount, other, "--index", index_dir, "--json", ok=False)
    assert result.exit_code == 1
    message = str(result.exception)
    assert "--prune-empty" in message and str(mount) in message and "3 indexed files" in message
    s = summary(result)
    assert s["removed"] == 0 and s["copied"] == 1  # the other folder was indexed as usual (a copy: its vectors)
    assert s["emptied_roots"] == [{"path": str(mount), "kept_files": 3}]
    assert set(before) <= set(stored(index_dir))

    s = summary(clap("index", mount, other, "--index", index_dir, "--json", "--prune-empty"))
    assert s["removed"] == 3 and s["total_files"] == 2


def test_rebuild_of_an_emptied_folder_is_refused(tiny_model_dir, tmp_path):
    mount, index_dir = small_library(tmp_path / "drive", 2), tmp_path / "idx"
    clap("index", mount, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)
    shutil.rmtree(mount)
    mount.mkdir()
    result = clap("index", mount, "--index", index_dir, "--rebuild", ok=False)
    assert result.exit_code == 1 and "--prune-empty" in str(result.exception)
    assert stored(index_dir) == before


def test_first_run_on_a_folder_without_audio_says_so(tiny_model_dir, tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "notes.txt").write_text("no audio here")
    result = clap("index", root, "--index", tmp_path / "idx", "--model", tiny_model_dir, ok=False)
    assert result.exit_code == 1 and "no audio files under" in str(result.exception)
    assert not (tmp_path / "idx").exists()


# -- 3. a failed run leaves no index behind --------------------------------------------------------------


def test_failed_model_load_creates_no_index(tmp_path):
    root, index_dir = small_library(tmp_path / "lib", 1), tmp_path / "idx"
    refused = tmp_path / "refused.pt"
    refused.write_bytes(b"not a checkpoint")
    for model in (tmp_path / "missing-weights", refused):
        result = clap("index", root, "--index", index_dir, "--model", model, ok=False)
        assert result.exit_code == 1
        assert not index_dir.exists()
    result = clap("search", "dog", "--index", index_dir, ok=False)
    assert result.exit_code == 1 and "no index at" in str(result.exception)


# -- 4. a damaged database: --rebuild recovers it, keeping the file aside -------------------------------------


def test_garbage_database_is_recovered_by_rebuild_and_kept_aside(tiny_model_dir, tmp_path):
    root, index_dir = small_library(tmp_path / "lib", 2), tmp_path / "idx"
    index_dir.mkdir()
    garbage = b"this is not an SQLite database at all" * 100
    (index_dir / "index.sqlite").write_bytes(garbage)

    result = clap("index", root, "--index", index_dir, "--model", tiny_model_dir, ok=False)
    assert result.exit_code == 1
    assert "not a clap index database" in str(result.exception) and "--rebuild" in str(result.exception)
    assert "kept aside" in str(result.exception)

    result = clap("index", root, "--index", index_dir, "--rebuild", "--model", tiny_model_dir)
    assert "kept as" in result.output
    kept = list(index_dir.glob("index.sqlite.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    assert len(stored(index_dir)) == 2 and len(hits(index_dir)) == 2


# -- 5. a read-only index can be searched ---------------------------------------------------------------------


def _read_only_command(index_dir: Path, argv: list[str]) -> list[str]:
    """`argv` run where `index_dir` cannot be written: a read-only bind mount of it for root (who writes
    through permissions), read-only permissions otherwise."""
    if os.geteuid() != 0:
        for path in index_dir.iterdir():
            path.chmod(0o444)
        index_dir.chmod(0o555)
        return argv
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a read-only mount")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    d = shlex.quote(str(index_dir))
    mount = f"mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec " + shlex.join(argv)
    return ["unshare", "-m", "sh", "-c", mount]


def test_read_only_index_is_searched_without_writing(tiny_model_dir, tmp_path):
    """The index lies on a read-only mount (or in a read-only folder); the hnsw graph is built in the reader
    (EXACT_BELOW = 0) and kept in memory."""
    root, index_dir = small_library(tmp_path / "lib", 3), tmp_path / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir)  # closes: one file, no -wal, no -shm
    shared = tmp_path / "shared"
    shutil.copytree(index_dir, shared)  # searching leaves -wal/-shm files behind: search the original for reference
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # the mode whose readers need a -shm file
    con.close()
    script = ("import sys; import clapcli.index.ann as ann; ann.EXACT_BELOW = 0; "
              "from clapcli.cli.main import main; sys.argv = ['clap', *sys.argv[1:]]; main()")
    expected = hits(index_dir)  # exact search in the writable original
    assert len(expected) == 3
    index_dir = shared
    argv = [sys.executable, "-c", script, "search", "dog", "--index", str(index_dir), "--paths", "-k", "50"]
    listing = sorted(os.listdir(index_dir))
    assert "index.sqlite-shm" not in listing
    try:
        proc = subprocess.run(_read_only_command(index_dir, argv), capture_output=True, text=True, timeout=300)
    finally:
        index_dir.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(expected) and proc.stdout.split()[0] == expected[0]
    assert sorted(os.listdir(index_dir)) == listing  # no lock, no -shm, no hnsw file written


# -- 6. a killed or interrupted run ------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _many_files(root: Path, n: int, seconds: float = 3.0) -> Path:
    """`n` distinct clips, each decoding to more than a pipe's 64 KiB, so workers run ahead of the model."""
    from audio_synth import tone_noise, write_audio

    for i in range(n):
        write_audio(root / f"clip_{i:02d}.wav", tone_noise(seconds, 16_000, seed=i), 16_000, subtype="PCM_16")
    return root


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the decode workers")
def test_decode_workers_die_with_a_killed_indexer(tiny_model_dir, tmp_path):
    import signal
    import time

    root = tmp_path / "lib"
    root.mkdir()
    _many_files(root, 40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clapcli", "index", str(root), "--index", str(tmp_path / "idx"),
         "--model", str(tiny_model_dir), "--workers", "2", "--batch-size", "1", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline, workers = time.monotonic() + 120, set()
        while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.2)
        assert len(workers) == 2, "the decode workers never started"
        time.sleep(1.0)  # let them decode ahead and fill their queues
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a decode worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid) | workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_ctrl_c_says_what_was_committed_and_a_rerun_resumes(tiny_model_dir, tmp_path):
    import re
    import signal
    import time

    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    root.mkdir()
    _many_files(root, 12, seconds=1.0)
    argv = [sys.executable, "-m", "clapcli", "index", str(root), "--index", str(index_dir), "--model",
            str(tiny_model_dir), "--workers", "0", "--batch-size", "1", "--commit-every", "2", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and committed_files(index_dir) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    match = re.match(r"interrupted: (\d+) files embedded and committed to (.+) in this run, (\d+) not yet; "
                     r"run the same command again to resume$", lines[0])
    assert match, lines[0]
    committed = int(match.group(1))
    assert committed == committed_files(index_dir) and 2 <= committed < 12
    assert committed + int(match.group(3)) == 12 and match.group(2) == str(index_dir)

    s = summary(clap(*argv[3:]))
    assert s["added"] == 12 - committed and s["unchanged"] == committed and s["total_files"] == 12
