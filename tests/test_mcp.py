"""`clap mcp` through the SDK's own client (`mcp.client.stdio` + `ClientSession`) against a spawned `clap mcp`
process, on a small index built with the tiny model: each tool answers with the keys (and values) of the matching
`--json` output, errors come back as tool errors with the CLI's one-line message, and nothing is written.

One server answers every call of the happy path (`answers`, module-scoped: a spawn and a model load cost seconds);
the tests then read its answers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from entry_point import clap_executable

TIMEOUT = 240  # seconds for one whole client session: a spawn, a model load, a few calls
INDEX = "sounds"
FILES = {"tones/a.wav": 1.0, "tones/b.flac": 2.5, "long.wav": 14.0, "c.wav": 3.0}  # long.wav has 10 s windows
COPY = "copies/a.flac"  # the samples of tones/a.wav in another format: a duplicate for `dedupe`
INDEXED = len(FILES) + 1


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_session(home: Path, index: str, calls: list[tuple[str, dict]], progress: list | None = None):
    """Spawn `clap mcp --index INDEX` with CLAP_HOME=home; returns (tools listed, [CallToolResult per call]). With
    `progress`, each call asks for progress notifications and `progress` gets (call number, progress, total)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=clap_executable(), args=["mcp", "--index", index],
                                   env=dict(os.environ, CLAP_HOME=str(home)))

    def on_progress(number: int):
        async def record(done: float, total: float | None, message: str | None) -> None:
            progress.append((number, done, total))

        return record if progress is not None else None

    async def session():
        with anyio.fail_after(TIMEOUT):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                tools = (await client.list_tools()).tools
                return tools, [await client.call_tool(name, args, progress_callback=on_progress(number))
                               for number, (name, args) in enumerate(calls)]

    return anyio.run(session)


def rows(result) -> list[dict]:
    """A successful call's objects, read from its text blocks (one JSON object each, as `--json` lines) after
    checking that the structured result holds the same."""
    assert not result.is_error, result.content
    texts = [json.loads(block.text) for block in result.content]
    assert result.structured_content == {"result": texts}
    return texts


def error_text(result) -> str:
    assert result.is_error, result.content
    assert len(result.content) == 1
    return result.content[0].text


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots: path → (size, mtime_ns), but for SQLite's shared-memory and (empty) WAL files,
    which any reader of the database makes beside it, `clap search` too."""
    out = {}
    for root in roots:
        for base, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith("-shm") or (name.endswith("-wal") and not os.path.getsize(os.path.join(base, name))):
                    continue
                st = os.stat(os.path.join(base, name))
                out[os.path.join(base, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("mcp-home")


@pytest.fixture(scope="module")
def sounds(tmp_path_factory, home, tiny_model_dir):
    """A library of four sounds and a broken file, indexed as the named index `sounds` of `home`."""
    root = tmp_path_factory.mktemp("mcp-library")
    for i, (rel, seconds) in enumerate(FILES.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(root / rel, tone_noise(seconds, 48_000, seed=10 + i), 48_000)
    (root / COPY).parent.mkdir()
    write_audio(root / COPY, tone_noise(FILES["tones/a.wav"], 48_000, seed=10), 48_000)
    (root / "broken.wav").write_text("this is not a sound file\n" * 20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(home))
        clap("index", root, "--index", INDEX, "--model", tiny_model_dir, "--workers", "1", ok=False)
        clap("tag", "--index", INDEX, "--labels", "dog,rain,siren", "--top", 1)  # each file's best label, stored
    assert (home / "indexes" / INDEX / "index.sqlite").is_file()
    return root


CALLS = {
    "search": ("search", {"query": "metal impact", "k": 10}),
    "search_plus_minus": ("search", {"query": "metal impact + glass - rain", "k": 3}),
    "similar": ("similar", {"path": "tones/a.wav", "k": 10}),
    "tag": ("tag", {"paths": ["tones/a.wav", "long.wav", "broken.wav"], "labels": "dog,rain,siren", "top": 2,
                    "timeline": True}),
    "indexes": ("indexes", {}),
    "tagged": ("search", {"query": "metal impact", "tag": ["dog"], "k": 10}),
    "not_tagged": ("search", {"query": "metal impact", "not_tag": ["dog"], "k": 10}),
    "unknown_tag": ("search", {"query": "metal impact", "tag": ["dgo"]}),
    "dedupe": ("dedupe", {"threshold": 0.5}),
    "bad_labels": ("tag", {"paths": ["tones/a.wav"], "labels": "@no-such-labels.txt"}),
    "outside": ("similar", {"path": "outside.wav"}),
    "unindexable": ("similar", {"path": "broken.wav"}),
    "bad_k": ("search", {"query": "rain", "k": 0}),
}


@pytest.fixture(scope="module")
def answers(sounds, home, tmp_path_factory):
    """{call name: CallToolResult} from one server, the tools it listed, and the files before and after."""
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.wav"
    write_audio(outside, tone_noise(1.0, 48_000, seed=3), 48_000)
    resolve = {"tones/a.wav": str(sounds / "tones/a.wav"), "long.wav": str(sounds / "long.wav"),
               "broken.wav": str(sounds / "broken.wav"), "outside.wav": str(outside)}

    def absolute(args: dict) -> dict:
        args = dict(args)
        if "path" in args:
            args["path"] = resolve[args["path"]]
        if "paths" in args:
            args["paths"] = [resolve[p] for p in args["paths"]]
        return args

    before = tree(home / "indexes", sounds)
    progress: list[tuple[int, float, float | None]] = []
    tools, results = run_session(home, INDEX, [(name, absolute(args)) for name, args in CALLS.values()], progress)
    after = tree(home / "indexes", sounds)
    progress_by_call = {name: [(done, total) for number, done, total in progress if number == i]
                        for i, name in enumerate(CALLS)}
    return {"tools": tools, "before": before, "after": after, "progress": progress_by_call,
            **dict(zip(CALLS, results))}


@pytest.fixture
def in_home(home, monkeypatch):
    """Run in-process `clap` commands (the answers to compare with) against the same CLAP_HOME."""
    monkeypatch.setenv("CLAP_HOME", str(home))


def test_the_tools_are_listed_and_marked_read_only(answers):
    tools = {t.name: t for t in answers["tools"]}
    assert set(tools) == {"search", "similar", "tag", "dedupe", "indexes"}
    for tool in tools.values():
        assert tool.annotations.read_only_hint is True and tool.annotations.destructive_hint is False
        assert tool.description
    assert set(tools["search"].input_schema["properties"]) == {"query", "negative", "k", "min_score", "tag",
                                                                  "not_tag", "tag_set"}
    assert "ctx" not in tools["tag"].input_schema["properties"]


def test_search_answers_as_clap_search_json(answers, in_home):
    expected = json_lines(clap("search", "metal", "impact", "--index", INDEX, "--json", "-k", 10).stdout)
    got = rows(answers["search"])
    assert len(got) == INDEXED and got == expected
    assert got[0]["query"] == {"text": ["metal impact"], "not": [], "audio": [], "not_audio": []}
    windowed = [h["path"] for h in got if h["start"] is not None]
    assert windowed == [h["path"] for h in got if h["path"].endswith("long.wav")]  # the only file with windows


def test_search_reads_plus_and_minus_as_the_search_box_does(answers, in_home):
    expected = json_lines(clap("search", "metal", "impact", "+", "glass", "-", "rain", "--index", INDEX, "--json",
                               "-k", 3).stdout)
    got = rows(answers["search_plus_minus"])
    assert got == expected and len(got) == 3
    assert got[0]["query"] == {"text": ["metal impact", "glass"], "not": ["rain"], "audio": [],
                                "not_audio": []}


def test_search_filters_by_stored_tags_as_clap_search_does(answers, in_home):
    """`tag` keeps the files whose stored tags hold the label, `not_tag` the others: together every indexed file,
    each answer `clap search --tag/--not-tag --json`'s, each hit with its stored tags."""
    tagged, others = rows(answers["tagged"]), rows(answers["not_tagged"])
    assert tagged == json_lines(clap("search", "metal", "impact", "--tag", "dog", "--index", INDEX, "--json",
                                     "-k", 10).stdout)
    assert others == json_lines(clap("search", "metal", "impact", "--not-tag", "dog", "--index", INDEX, "--json",
                                     "-k", 10).stdout)
    assert len(tagged) + len(others) == INDEXED and not {h["path"] for h in tagged} & {h["path"] for h in others}
    assert all([t["label"] for t in h["tags"]] == ["dog"] for h in tagged)
    assert all([t["label"] for t in h["tags"]] != ["dog"] for h in others)
    unknown = clap("search", "metal", "impact", "--tag", "dgo", "--index", INDEX, ok=False)
    assert error_text(answers["unknown_tag"]) == str(unknown.exception) and "dog" in str(unknown.exception)


def test_similar_ranks_the_other_files_as_a_search_by_that_file(answers, sounds, in_home):
    """The stored vector of the indexed file is the query (no model embeds it): the scores are those of `clap search
    --audio FILE`, which embeds it again; the file itself is left out and the ranks follow."""
    own = str((sounds / "tones/a.wav").resolve())
    got = rows(answers["similar"])
    assert own not in {h["path"] for h in got}
    assert [h["rank"] for h in got] == list(range(1, INDEXED))
    assert all(h["query"] == {"text": [], "not": [], "audio": [own], "not_audio": []} for h in got)
    expected = json_lines(clap("search", "--audio", own, "--index", INDEX, "--json", "-k", 10).stdout)
    by_path = {h["path"]: h for h in expected if h["path"] != own}
    assert set(by_path) == {h["path"] for h in got}
    for h in got:
        assert h["score"] == pytest.approx(by_path[h["path"]]["score"], abs=1e-4)
        assert (h["start"], h["end"], h["duration"]) == tuple(by_path[h["path"]][key] for key in ("start", "end",
                                                                                                     "duration"))


def test_tag_answers_as_clap_tag_json(answers, sounds, in_home, tiny_model_dir):
    """The index's own model tags (no model to name); a file that cannot be read is an entry with its error, as
    with `clap tag --json`."""
    paths = [str(sounds / p) for p in ("tones/a.wav", "long.wav", "broken.wav")]
    result = clap("tag", *paths, "--labels", "dog,rain,siren", "-k", 2, "--timeline", "--json", "--model",
                  tiny_model_dir, ok=False)
    assert result.exit_code == 1  # the broken file
    got = rows(answers["tag"])
    assert got == json_lines(result.stdout)
    assert [len(r["labels"]) for r in got] == [2, 2, 0] and "error" in got[2]
    assert len(got[1]["timeline"]) == 2  # 14 s: two 10 s windows
    assert answers["progress"]["tag"] == [(1, 3), (2, 3), (3, 3)]  # files done of files, as a progress bar counts


def test_indexes_answers_as_clap_index_list_json(answers, sounds, in_home):
    got = rows(answers["indexes"])
    assert got == json_lines(clap("index", "list", "--json").stdout)
    assert [(r["name"], r["files"], r["roots"]) for r in got] == [(INDEX, INDEXED, [str(sounds.resolve())])]


def test_dedupe_answers_as_clap_dedupe_json(answers, sounds, in_home):
    got = rows(answers["dedupe"])
    assert got == json_lines(clap("dedupe", "--index", INDEX, "--threshold", 0.5, "--json").stdout)
    assert [sorted([g["keeper"]["path"]] + [d["path"] for d in g["duplicates"]]) for g in got] == [
        sorted(str((sounds / p).resolve()) for p in ("tones/a.wav", COPY))]
    progress = answers["progress"]["dedupe"]  # (pairs compared, pairs to compare)
    assert progress and progress[-1][0] == progress[-1][1]


def test_a_bad_label_set_is_the_cli_error(answers, sounds, in_home, tiny_model_dir):
    result = clap("tag", sounds / "tones/a.wav", "--labels", "@no-such-labels.txt", "--model", tiny_model_dir,
                  ok=False)
    assert result.exception.exit_code == 2  # a usage error
    assert error_text(answers["bad_labels"]) == str(result.exception)
    assert "no-such-labels.txt" in str(result.exception)


def test_a_path_outside_the_index_is_refused_with_one_line(answers, home):
    text = error_text(answers["outside"])
    assert "outside.wav is not in the index at " + str(home / "indexes" / INDEX) in text
    assert "\n" not in text


def test_a_file_the_index_could_not_read_says_why(answers, sounds):
    text = error_text(answers["unindexable"])
    assert text.startswith(f"{sounds / 'broken.wav'} could not be indexed: ") and len(text) > len(str(sounds)) + 40


def test_arguments_outside_the_schema_are_tool_errors(answers):
    assert "k" in error_text(answers["bad_k"])


def test_the_server_writes_nothing_in_the_index_or_the_library(answers):
    assert answers["after"] == answers["before"]


def test_a_missing_index_is_the_cli_error_and_indexes_still_answer(sounds, home, in_home):
    """`clap mcp --index NAME` of an index that does not exist starts (an assistant can list the indexes), and each
    search answers with `clap search`'s error."""
    result = clap("search", "rain", "--index", "sound", ok=False)
    assert result.exception.exit_code == 1
    _tools, (search, similar, indexes) = run_session(home, "sound", [
        ("search", {"query": "rain"}), ("similar", {"path": str(sounds / "c.wav")}), ("indexes", {})])
    assert error_text(search) == str(result.exception) == error_text(similar)
    assert "did you mean sounds?" in error_text(search)
    assert [r["name"] for r in rows(indexes)] == [INDEX]


def test_without_the_sdk_the_command_names_the_extra(monkeypatch):
    """`pip install clapcli` without the extra: one line naming it, exit 1, no traceback."""
    from cli_runner import fails

    monkeypatch.setitem(sys.modules, "mcp", None)  # `import mcp` raises ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "mcp.server.mcpserver", None)
    text = fails("mcp", code=1, match="pip install 'clapcli[mcp]'")
    assert "Traceback" not in text


def test_a_running_server_sees_what_clap_index_commits_and_a_rebuild(tmp_path, tiny_model_dir):
    """The store stays open between calls: a new commit is searched at the next call, and a `--rebuild`, which swaps
    in a new database file, is opened again rather than answered from the old file."""
    from clapcli.serve.mcp import Library

    root = tmp_path / "lib"
    root.mkdir()
    for i, name in enumerate(["one.wav", "two.wav"]):
        write_audio(root / name, tone_noise(1.0, 48_000, seed=20 + i), 48_000)
    clap("index", root, "--index", "live", "--model", tiny_model_dir, "--workers", "1")
    library = Library("live")
    try:
        assert len(library.search("hum", k=10)) == 2
        write_audio(root / "three.wav", tone_noise(1.0, 48_000, seed=22), 48_000)
        clap("index", root, "--index", "live", "--model", tiny_model_dir, "--workers", "1")
        assert len(library.search("hum", k=10)) == 3
        (root / "one.wav").unlink()
        (root / "two.wav").unlink()
        clap("index", root, "--index", "live", "--model", tiny_model_dir, "--workers", "1", "--rebuild")
        assert [h["path"] for h in library.search("hum", k=10)] == [str((root / "three.wav").resolve())]
    finally:
        library.close()


def test_tag_needs_no_searchable_index(tmp_path, tiny_model_dir, monkeypatch):
    """Tagging needs no index: with none at --index the model is $CLAP_MODEL's (else the default model), as for
    `clap tag`; an index that holds no files yet (which `search` refuses as empty) lends its model."""
    from clapcli import load_model
    from clapcli.errors import IndexStoreError
    from clapcli.index.store import IndexStore
    from clapcli.serve.mcp import Library

    write_audio(tmp_path / "a.wav", tone_noise(1.0, 48_000, seed=5), 48_000)
    expected = json_lines(clap("tag", tmp_path / "a.wav", "--labels", "dog,rain", "--json", "--model",
                               tiny_model_dir).stdout)
    monkeypatch.setenv("CLAP_MODEL", str(tiny_model_dir))
    assert Library("nothing-here").tag([str(tmp_path / "a.wav")], labels="dog,rain") == expected
    monkeypatch.delenv("CLAP_MODEL")
    with IndexStore.open(tmp_path / "empty", create=True) as store:
        store.set_model_identity(load_model(tiny_model_dir, device="cpu").identity_dict)
    library = Library(str(tmp_path / "empty"))
    assert library.tag([str(tmp_path / "a.wav")], labels="dog,rain") == expected
    with pytest.raises(IndexStoreError, match="is empty"):
        library.search("rain")
