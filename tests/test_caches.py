"""Caches are checked, not trusted (issue 17 §6): the BM25 index cache and the search_qa corpus cache.

A damaged, partial or mismatched cache is rebuilt with one warning line and never used; the
result equals a fresh build. An intact cache is reused without rebuilding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from policyflow.tasks.search_qa import SearchQATask
from policyflow.tools.search import SearchIndex

TASK_ARGS = dict(seed=3, num_entities=60, num_eval_entities=12, num_eval=30)
INDEX_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")


@pytest.fixture
def task(tmp_path: Path) -> SearchQATask:
    return SearchQATask(**TASK_ARGS, corpus_dir=tmp_path / "corpus")


def _queries(task: SearchQATask) -> list[str]:
    return [e.name for e in task.entities[::7]] + [e.capital for e in task.entities[3::11]] + ["pop capital"]


def _results(index: SearchIndex, queries: list[str]) -> list[list[tuple[str, float]]]:
    return [[(p.id, round(s, 5)) for p, s in index.search(q, k=3)] for q in queries]


def _notes(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and word in r.getMessage()]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 2):  # the middle and near the end (past any npy header)
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


DAMAGES: dict[str, Callable[[Path], None]] = {"truncate": _truncate, "flip": _flip, "empty": _empty, "delete": _delete}


# --- the BM25 index cache ------------------------------------------------------------------


@pytest.mark.parametrize("name", INDEX_FILES)
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_index_cache_is_rebuilt(task, tmp_path, caplog, name, damage):
    """Known example: a damaged index file gave a bare JSONDecodeError / numpy ValueError (or, a
    flipped byte in the arrays, silently other scores) and was never rebuilt."""
    corpus, queries = task.corpus_path(), _queries(task)
    fresh = SearchIndex(corpus, tmp_path / "fresh")
    cache = tmp_path / "cache"
    first = SearchIndex(corpus, cache)
    DAMAGES[damage](first.index_dir / name)
    with caplog.at_level(logging.WARNING):
        again = SearchIndex(corpus, cache)
    assert len(_notes(caplog, "rebuilding")) == 1, caplog.text
    assert str(first.index_dir) in _notes(caplog, "rebuilding")[0]
    assert again.built and len(again.passages) == len(fresh.passages) == 60
    assert _results(again, queries) == _results(fresh, queries)
    # the rebuilt cache is whole: the next load uses it, silently, with the same results
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = SearchIndex(corpus, cache)
    assert not third.built and _warnings(caplog) == []
    assert _results(third, queries) == _results(fresh, queries)
    assert [p.name for p in cache.iterdir()] == [first.index_dir.name]  # nothing left aside


@pytest.mark.parametrize("damage", ["no manifest", "truncated manifest", "manifest of another corpus", "files of another corpus", "empty folder"])
def test_partial_or_mismatched_index_cache_is_rebuilt(task, tmp_path, caplog, damage):
    """A cache without its manifest (a partial write, or one from before manifests), with a
    damaged one, or holding another corpus's index under this corpus's name, is never used."""
    corpus, queries = task.corpus_path(), _queries(task)
    other = SearchQATask(seed=4, num_entities=60, num_eval_entities=12, num_eval=30, corpus_dir=tmp_path / "other")
    fresh = SearchIndex(corpus, tmp_path / "fresh")
    cache = tmp_path / "cache"
    folder = SearchIndex(corpus, cache).index_dir
    foreign = SearchIndex(other.corpus_path(), tmp_path / "foreign").index_dir
    if damage == "no manifest":
        (folder / "manifest.json").unlink()
    elif damage == "truncated manifest":
        _truncate(folder / "manifest.json")
    elif damage == "manifest of another corpus":  # another corpus's whole cache, manifest and all
        shutil.rmtree(folder)
        shutil.copytree(foreign, folder)
    elif damage == "files of another corpus":  # this manifest, another corpus's index files
        for name in INDEX_FILES:
            shutil.copy(foreign / name, folder / name)
    else:
        shutil.rmtree(folder)
        folder.mkdir()
    with caplog.at_level(logging.WARNING):
        again = SearchIndex(corpus, cache)
    assert len(_notes(caplog, "rebuilding")) == 1, caplog.text
    assert again.built and _results(again, queries) == _results(fresh, queries)
    assert not SearchIndex(corpus, cache).built


def test_intact_index_cache_is_reused(task, tmp_path, caplog, monkeypatch):
    """An intact cache is loaded, not rebuilt (counted on the build function), with no note."""
    import policyflow.tools.search as search

    builds = []
    real = search._build_index
    monkeypatch.setattr(search, "_build_index", lambda passages, folder: (builds.append(folder), real(passages, folder)))
    corpus, cache = task.corpus_path(), tmp_path / "cache"
    first = SearchIndex(corpus, cache)
    assert first.built and len(builds) == 1
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            again = SearchIndex(corpus, cache)
            assert not again.built
    assert len(builds) == 1 and _warnings(caplog) == []
    assert _results(again, _queries(task)) == _results(first, _queries(task))


def test_index_manifest_lists_every_file_and_the_corpus(task, tmp_path):
    """The manifest (written last) names the corpus digest, the passage count, and each file's size and sha256."""
    from policyflow.tools.cache import sha256_file

    index = SearchIndex(task.corpus_path(), tmp_path / "cache")
    manifest = json.loads((index.index_dir / "manifest.json").read_text())
    assert manifest["key"]["passages"] == 60 and manifest["key"]["corpus_sha256"].startswith(index.index_dir.name)
    assert sorted(manifest["files"]) == sorted(INDEX_FILES)
    for name, entry in manifest["files"].items():
        path = index.index_dir / name
        assert entry == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


@pytest.mark.parametrize("start", ["no cache", "damaged cache"])
def test_concurrent_builds_are_safe(task, tmp_path, monkeypatch, start):
    """Two loaders (rollout workers) building the same cache at once: each builds in a private
    folder; one rename wins; both get a correct index; one whole cache is left, and no debris."""
    import policyflow.tools.search as search

    corpus, queries, cache = task.corpus_path(), _queries(task), tmp_path / "cache"
    fresh = SearchIndex(corpus, tmp_path / "fresh")
    if start == "damaged cache":
        _truncate(SearchIndex(corpus, cache).index_dir / "data.csc.index.npy")
    both_built = threading.Barrier(2, timeout=60)
    real = search._build_index

    def build(passages, folder):
        real(passages, folder)
        both_built.wait()  # neither renames its folder into place before the other has built

    monkeypatch.setattr(search, "_build_index", build)
    found: list[SearchIndex] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            found.append(SearchIndex(corpus, cache))
        except BaseException as err:  # reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(found) == 2 and all(i.built for i in found)
    for index in found:
        assert _results(index, queries) == _results(fresh, queries)
    assert [p.name for p in cache.iterdir()] == [found[0].index_dir.name]
    monkeypatch.setattr(search, "_build_index", real)
    assert not SearchIndex(corpus, cache).built


# --- the search_qa corpus cache -----------------------------------------------------------------


def _first_half(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))


def _extra_row(path: Path) -> None:
    path.write_text(path.read_text() + json.dumps({"id": "x", "title": "Bogus", "text": "capital Nowhere, pop 1"}) + "\n")


CORPUS_DAMAGES: dict[str, Callable[[Path], None]] = {
    "first half (valid JSONL)": _first_half, "truncate mid-line": _truncate, "flip": _flip, "empty": _empty, "extra row": _extra_row,
}


@pytest.mark.parametrize("damage", sorted(CORPUS_DAMAGES))
def test_damaged_corpus_cache_is_rewritten(task, tmp_path, caplog, damage):
    """Known example: a corpus cut to its first half, still valid JSONL under the same name, was
    used silently and the run searched half the places. Now it is rewritten with one note."""
    path = task.corpus_path()
    whole = path.read_bytes()
    CORPUS_DAMAGES[damage](path)
    with caplog.at_level(logging.WARNING):
        again = task.corpus_path()
    assert again == path and path.read_bytes() == whole
    assert len(_notes(caplog, "rewriting")) == 1 and str(path) in _notes(caplog, "rewriting")[0], caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left


def test_half_corpus_searches_every_place(tmp_path, caplog):
    """The known example end to end: after the corpus cache is cut in half, the task's search
    tool still finds every place, those of the cut-off half included."""
    task = SearchQATask(**TASK_ARGS, corpus_dir=tmp_path / "corpus", top_k=1)
    _first_half(task.corpus_path())
    with caplog.at_level(logging.WARNING):
        pool = task.tool_pool()
    for place in task.entities[30:]:  # the half that was cut off
        result = asyncio.run(pool.call("search", {"query": place.name}))
        assert result.ok and result.text == f"{place.name}: capital {place.capital}, pop {place.pop}"
    assert len(_notes(caplog, "rewriting")) == 1


def test_intact_corpus_cache_is_reused(task, caplog, monkeypatch):
    """An intact corpus file is read, not rewritten (counted on the write function), with no note;
    a deleted one is written again silently (a first use)."""
    import policyflow.tasks.search_qa as search_qa

    writes = []
    real = search_qa._write_corpus
    monkeypatch.setattr(search_qa, "_write_corpus", lambda path, data: (writes.append(path), real(path, data)))
    path = task.corpus_path()
    stamp = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        assert [task.corpus_path() for _ in range(3)] == [path] * 3
    assert len(writes) == 1 and path.stat().st_mtime_ns == stamp and _warnings(caplog) == []
    path.unlink()
    with caplog.at_level(logging.WARNING):
        assert task.corpus_path() == path
    assert len(writes) == 2 and _warnings(caplog) == []
    assert len(path.read_text().splitlines()) == 60
