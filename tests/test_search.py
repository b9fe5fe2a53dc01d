"""BM25 search tool: retrieval, the on-disk index cache, the token budget, injected latency."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from policyflow.tools import ToolPool
from policyflow.tools.search import NO_RESULTS, CorpusError, SearchIndex, search_tool

ROWS = [
    {"id": "zorvia", "title": "Zorvia", "text": "The capital of Zorvia is Quelm. Zorvia has 4812 people."},
    {"id": "brelk", "title": "Brelk", "text": "The capital of Brelk is Tamo. Brelk has 77 people."},
    {"id": "quonto", "title": "Quonto", "text": "Quonto is a river that floods every spring."},
    {"id": "mirel", "title": "Mirel", "text": "The capital of Mirel is Fasp. Mirel trades salt."},
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_retrieval_finds_the_right_passage(corpus, tmp_path):
    index = SearchIndex(corpus, tmp_path / "cache")
    assert [p.id for p, _ in index.search("capital of Brelk", k=1)] == ["brelk"]
    assert [p.id for p, _ in index.search("river floods", k=1)] == ["quonto"]
    ranked = index.search("Mirel capital", k=4)
    assert ranked[0][0].id == "mirel" and all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
    assert {p.id for p, _ in ranked} == {"mirel", "zorvia", "brelk"}  # the river shares no term
    assert index.search("xyzzy", k=3) == [] and index.search("the of", k=3) == []  # stopwords only


def test_index_is_cached_by_corpus_content(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = SearchIndex(corpus, cache)
    assert first.built and first.index_dir.parent == cache
    stamp = (first.index_dir / "params.index.json").stat().st_mtime_ns
    second = SearchIndex(corpus, cache)
    assert not second.built and second.index_dir == first.index_dir
    assert (second.index_dir / "params.index.json").stat().st_mtime_ns == stamp
    assert [p.id for p, _ in second.search("Tamo", k=1)] == ["brelk"]
    # a changed corpus gets a new index, the old one stays
    corpus.write_text(corpus.read_text() + json.dumps({"id": "new", "title": "Vesk", "text": "Vesk is new."}) + "\n")
    third = SearchIndex(corpus, cache)
    assert third.built and third.index_dir != first.index_dir
    assert [p.id for p, _ in third.search("Vesk", k=1)] == ["new"]
    assert sorted(d.name for d in cache.iterdir()) == sorted([first.index_dir.name, third.index_dir.name])


def test_bad_corpus_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": 3, "text": "x"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: .*'id' and 'text'"):
        SearchIndex(bad, tmp_path / "c")
    bad.write_text('{"id": "a", "text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not valid JSON"):
        SearchIndex(bad, tmp_path / "c")


def test_search_tool_output(corpus, tmp_path):
    """The top-k passages, whole (the episode runner, not the tool, cuts observations to agent.max_obs_tokens)."""
    index = SearchIndex(corpus, tmp_path / "cache")
    full = asyncio.run(search_tool(index, k=1).fn(query="Brelk"))
    assert full == "Brelk: The capital of Brelk is Tamo. Brelk has 77 people."
    two = asyncio.run(search_tool(index, k=2).fn(query="capital Quelm"))
    assert two.splitlines()[0].startswith("Zorvia: ") and len(two.splitlines()) == 2
    assert asyncio.run(search_tool(index).fn(query="xyzzy")) == NO_RESULTS
    with pytest.raises(ValueError, match="k >= 1"):
        search_tool(index, k=0)


def test_search_tool_in_pool_with_latency(corpus, tmp_path):
    index = SearchIndex(corpus, tmp_path / "cache")
    pool = ToolPool([search_tool(index, k=1, latency_s=0.05)], timeout_s=5)
    result = asyncio.run(pool.call("search", {"query": "Mirel"}))
    assert result.ok and result.text.startswith("Mirel: ") and result.seconds >= 0.05
    slow = ToolPool([search_tool(index, latency_s=1.0)], timeout_s=0.02)
    assert asyncio.run(slow.call("search", {"query": "Mirel"})).error == "timeout"


def test_unreadable_corpus_rows_name_file_and_line(tmp_path):
    """Rows json cannot convert (nested too deep, a number too long) and bytes that are not
    UTF-8 are a CorpusError naming the file (and line), never a bare RecursionError/ValueError."""
    bad = tmp_path / "bad.jsonl"
    for row, match in (("[" * 100_000 + "]" * 100_000, "bad.jsonl:2: not valid JSON"), ('{"id": "b", "text": "x", "n": ' + "9" * 5000 + "}", "bad.jsonl:2: not valid JSON")):
        bad.write_text('{"id": "a", "text": "ok"}\n' + row + "\n")
        with pytest.raises(CorpusError, match=match):
            SearchIndex(bad, tmp_path / "c")
    bad.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl: not UTF-8"):
        SearchIndex(bad, tmp_path / "c")
