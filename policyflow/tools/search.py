"""Local search: BM25 (the `bm25s` library) over a JSONL corpus, with the index cached on disk.

The corpus is a JSONL file of `{"id", "title", "text"}` rows. The index is built once per
corpus content: it is saved under `<cache_dir>/<sha256 of the corpus file>[:16]/` and loaded
from there on later runs (and by every other process reading the same corpus), after checking
it against its manifest (`tools/cache.py`: a damaged cache is rebuilt, never used). No server and
no downloads: tokenization is bm25s's regex splitter with its bundled English stopword list,
without stemming.

`search_tool` wraps an index as a `Tool` whose result is the top-k passages as text (cut to
`agent.max_obs_tokens` tokens by the episode runner, like every observation), with optional
injected latency to imitate a remote search engine in benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import bm25s

from policyflow.tools.base import Tool
from policyflow.tools.cache import CacheError, load_or_build

_STOPWORDS = "en"
_INDEX_FORMAT = "bm25s-en-nostem-v1"  # part of the cache key: change it when tokenization changes
NO_RESULTS = "no results"


class CorpusError(ValueError):
    """A corpus file that cannot be indexed; the message names the file and line."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def read_corpus(path: Path) -> list[Passage]:
    """The passages of a JSONL corpus, in file order; every row needs string `id` and `text`."""
    return parse_corpus(path, Path(path).read_bytes())


def parse_corpus(path: Path, data: bytes) -> list[Passage]:
    """The passages in `data`, the bytes of the corpus file `path` (named in every error, with the line)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 (byte {err.start}); a corpus is UTF-8 JSONL") from None
    passages = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        except (ValueError, RecursionError) as err:  # nested too deep, or a number too long to convert
            raise CorpusError(f"{path}:{line_no}: not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("text"), str):
            raise CorpusError(f"{path}:{line_no}: a corpus row needs string fields 'id' and 'text' (and optionally 'title')")
        passages.append(Passage(id=row["id"], title=str(row.get("title", "")), text=row["text"]))
    if not passages:
        raise CorpusError(f"{path}: the corpus has no rows")
    return passages


def _digest(data: bytes) -> str:
    """The sha256 (hex) of the index format and the corpus bytes: what an index is built from."""
    return hashlib.sha256(_INDEX_FORMAT.encode() + data).hexdigest()


def _terms(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=_STOPWORDS, return_ids=False, show_progress=False)


def _build_index(passages: list[Passage], folder: Path) -> None:
    """Index `passages` (title and text) with BM25 and save the index files into `folder`."""
    retriever = bm25s.BM25()
    retriever.index(_terms([f"{p.title} {p.text}" for p in passages]), show_progress=False)
    retriever.save(str(folder), show_progress=False)


class SearchIndex:
    """A BM25 index over one corpus file. `built` says whether this load built it (else: cache hit).

    The index cache (`<cache_dir>/<digest[:16]>/`) is checked, not trusted (`tools/cache.py`):
    its manifest, written last, holds the corpus digest, the passage count and the size and
    sha256 of every index file. A cache that is missing any of it, does not match it, or fails
    to load is rebuilt with one warning line and never used; concurrent builds are safe.
    """

    def __init__(self, corpus_path: str | Path, cache_dir: str | Path | None = None):
        self.corpus_path = Path(corpus_path)
        data = self.corpus_path.read_bytes()  # read once: the passages and the cache key come from the same bytes
        self.passages = parse_corpus(self.corpus_path, data)
        cache_root = Path(cache_dir) if cache_dir is not None else self.corpus_path.parent / ".bm25_cache"
        digest = _digest(data)
        self.index_dir = cache_root / digest[:16]
        key = {"format": _INDEX_FORMAT, "corpus_sha256": digest, "passages": len(self.passages)}
        self._bm25, self.built = load_or_build(
            self.index_dir, key, lambda tmp: _build_index(self.passages, tmp), self._load, "search index cache"
        )

    def _load(self, folder: Path) -> bm25s.BM25:
        """The index saved in `folder`, read whole into memory; CacheError unless it has one document per passage."""
        bm25 = bm25s.BM25.load(str(folder), show_progress=False)
        if bm25.scores.get("num_docs") != len(self.passages):
            raise CacheError(f"the index has {bm25.scores.get('num_docs')} documents for {len(self.passages)} passages")
        return bm25

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """Up to `k` passages sharing a term with `query`, best first, with their BM25 scores."""
        terms = _terms([query])
        if not terms[0]:
            return []
        k = min(k, len(self.passages))
        docs, scores = self._bm25.retrieve(terms, k=k, show_progress=False, n_threads=1)
        return [(self.passages[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def format_passages(passages: list[Passage]) -> str:
    """One passage per line, `title: text` (just the text when there is no title)."""
    if not passages:
        return NO_RESULTS
    return "\n".join(f"{p.title}: {p.text}" if p.title else p.text for p in passages)


SEARCH_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "Words to look up."}},
    "required": ["query"],
    "additionalProperties": False,
}


def search_tool(index: SearchIndex, *, k: int = 3, latency_s: float = 0.0, name: str = "search") -> Tool:
    """A `Tool` returning the top-`k` passages for a query, one per line (`format_passages`).

    The result is not cut here: the episode runner cuts every observation, whatever tool made
    it, to `agent.max_obs_tokens` tokens of the model's tokenizer (`tokens.render_observation`).
    `latency_s` > 0 sleeps that long per call to imitate a remote search engine. Retrieval is
    synchronous here: `ToolPool` runs every tool in a thread of its own, off the event loop.
    """
    if k < 1 or latency_s < 0:
        raise ValueError(f"search_tool needs k >= 1 and latency_s >= 0; got k={k}, latency_s={latency_s}")

    async def search(query: str) -> str:
        if latency_s:
            await asyncio.sleep(latency_s)
        hits = index.search(query, k)
        return format_passages([p for p, _ in hits])

    return Tool(name=name, description="Search the local corpus; returns the best matching passages.", parameters=SEARCH_SCHEMA, fn=search)
