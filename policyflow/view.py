"""`policyflow view runs/<name>`: one self-contained HTML page to browse a run's episodes.

The page (`view.html` in the run folder unless told otherwise) needs no server and no internet:
the episodes are embedded in it as JSON, and its script and style are inline
(`policyflow/view_page.html` is the template). Sources: the training episodes of
`samples.jsonl` ("train") and every evaluation's `eval/<id>/episodes.jsonl` ("eval/<id>").

Each line is one episode record (`rollout.episode_record`): step, version, reward and its named
parts, advantage, status, and the segments (prompt | gen | obs) with per-token texts, loss-mask
bits and policy versions, plus the calls (the segments each engine call saw, and the one it
produced). Optional fields may be missing; older `samples.jsonl` lines (the episode under an
`"episode"` key, no token ids) show their segments' text as one span each.

The page lists `PAGE_SIZE` episodes at a time (filtered by status, step, reward and text, sorted by
step, reward or staleness), so 10,000 episodes render as fast as 50. Opening an episode shows each
call's context and generated tokens: trained tokens (loss mask 1) and masked ones in different
colours, and per token its version and staleness = record version − token version (colour and
hover title).

Layout, so that the first rows show before the bulk of the page is read: a small JSON summary per
episode (what the list shows, filters and sorts), then the page's script, then each episode's own
line, verbatim, in its own `<script type="application/json" id="d<source>-<index>">`, parsed only
when the episode is opened.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PAGE_SIZE = 50  # episode rows the page's list holds at once
TEMPLATE = "view_page.html"
DATA_MARK, EPISODES_MARK, TITLE_MARK = "__VIEWER_DATA__", "__VIEWER_EPISODES__", "__VIEWER_TITLE__"


class ViewError(ValueError):
    """A run folder the viewer cannot read; the message names the file and line."""


@dataclass(frozen=True)
class EpisodeSummary:
    """What the page's list shows, filters and sorts of one episode (`episode_summary`); the rest
    of the record is read from its line when the episode is opened."""

    kind: str
    step: float | None
    version: float | None
    episode_id: str
    task_id: str
    prompt: str
    answer: str
    reward: float | None
    reward_parts: dict[str, Any]
    advantage: float | None
    status: str
    finish_reason: str | None
    turns: float | None
    tool_calls: float | None
    tool_errors: float | None
    gen_tokens: int  # tokens of the gen segments
    max_staleness: float | None  # record version − the oldest token version; None without versions
    label: str  # an evaluation episode's set and mode (its `eval` field, e.g. "heldout greedy"), else ""


@dataclass(frozen=True)
class Source:
    """The episodes of one file: `train` (samples.jsonl) or `eval/<id>` (an evaluation's episodes.jsonl).

    `summaries[i]` is what the list shows of episode i (`episode_summary`); `lines[i]` its record as
    JSON text, shown when the episode is opened."""

    name: str
    path: Path
    summaries: tuple[EpisodeSummary, ...]
    lines: tuple[str, ...]


def run_sources(run_dir: Path) -> list[Source]:
    """The run's episode files, training first, then evaluations in folder order; refused when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (give runs/<name>)")
    files = [("train", run_dir / "samples.jsonl")] if (run_dir / "samples.jsonl").is_file() else []
    files += [(f"eval/{p.parent.name}", p) for p in sorted(run_dir.glob("eval/*/episodes.jsonl"))]
    if not files:
        raise ViewError(f"{run_dir} holds no samples.jsonl and no eval/*/episodes.jsonl: nothing to view (train with run.samples_every=N to write episodes)")
    return [read_source(name, path) for name, path in files]


def read_source(name: str, path: Path) -> Source:
    """Every episode of a JSON-lines file: its summary and its JSON text.

    A last line cut short with no newline (a run still writing) is left out; any other line that is
    not a JSON object is refused with its file and line number. A line with NaN or ±Infinity (which
    browsers' JSON.parse refuses) is written again with those values as null."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    summaries, kept = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        constants = []
        try:
            record = json.loads(line, parse_constant=lambda c: constants.append(c))  # NaN and ±Infinity: shown as missing
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # the writer is mid-line
            raise ViewError(f"{path}:{number}: not a JSON line ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ViewError(f"{path}:{number}: an episode line must be a JSON object, got {type(record).__name__}")
        summaries.append(episode_summary(record, f"{path.name}:{number}", name.split("/")[0]))
        kept.append(json.dumps(record, ensure_ascii=False) if constants else line)
    return Source(name, path, tuple(summaries), tuple(kept))


def episode_summary(record: dict[str, Any], where: str, default_kind: str = "train") -> EpisodeSummary:
    """The list's view of one episode record; a missing or mistyped field is None (numbers) or ""
    (text), the id defaults to `where` (file:line), and max_staleness = version − min(token versions).

    Older samples.jsonl lines keep the episode under `"episode"`; its fields count as the record's."""
    if isinstance(record.get("episode"), dict):
        record = {**record, **record["episode"]}
    version = _number(record.get("version"))
    segments = [s for s in record.get("segments") or [] if isinstance(s, dict)]
    token_versions = [v for s in segments if isinstance(s.get("versions"), list) for v in s["versions"] if _number(v) is not None]
    reward_parts = record.get("reward_parts") if isinstance(record.get("reward_parts"), dict) else {}
    text = lambda key: "" if record.get(key) is None else str(record[key])  # noqa: E731
    note = record.get("eval") if isinstance(record.get("eval"), dict) else {}
    return EpisodeSummary(
        kind=text("kind") or default_kind, step=_number(record.get("step")), version=version,
        episode_id=text("episode_id") or where, task_id=text("task_id"), prompt=text("prompt"), answer=text("answer"),
        reward=_number(record.get("reward")), reward_parts={str(k): v for k, v in reward_parts.items()}, advantage=_number(record.get("advantage")),
        status=text("status") or "unknown", finish_reason=text("finish_reason") or None,
        turns=_number(record.get("turns")), tool_calls=_number(record.get("tool_calls")), tool_errors=_number(record.get("tool_errors")),
        gen_tokens=sum(_segment_tokens(s) for s in segments if s.get("kind") == "gen"),
        max_staleness=None if version is None or not token_versions else version - min(token_versions),
        label=" ".join(str(note[k]) for k in ("set", "mode") if note.get(k) is not None),
    )


def _segment_tokens(segment: dict[str, Any]) -> int:
    """Tokens of a segment: its token ids (older lines: their `tokens` count)."""
    ids = segment.get("token_ids")
    return len(ids) if isinstance(ids, list) else int(_number(segment.get("tokens")) or 0)


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def page_chunks(title: str, sources: list[Source], page_size: int = PAGE_SIZE) -> Iterator[str]:
    """The HTML page in pieces: the template with the summaries (JSON) and each episode's line
    (`<script type="application/json" id="d<source>-<index>">`) filled in.

    Every `<` of the embedded JSON is written `\\u003c` (the same string to JSON.parse; `<` occurs in
    JSON only inside strings), so no episode text can end its script element; the page shows
    episode text through `textContent` only."""
    template = resources.files("policyflow").joinpath(TEMPLATE).read_text(encoding="utf-8")
    head, data_mark, rest = template.replace(TITLE_MARK, html.escape(title)).partition(DATA_MARK)
    middle, episodes_mark, tail = rest.partition(EPISODES_MARK)
    if not (data_mark and episodes_mark):
        raise ViewError(f"the page template {TEMPLATE} lacks its {DATA_MARK} or {EPISODES_MARK} mark")
    data = {"title": title, "page_size": page_size, "sources": [{"name": s.name, "path": str(s.path), "episodes": [vars(e) for e in s.summaries]} for s in sources]}
    yield head
    yield json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    yield middle
    for k, source in enumerate(sources):
        for i, line in enumerate(source.lines):
            escaped = line.replace("<", "\\u003c")
            yield f'<script type="application/json" id="d{k}-{i}">{escaped}</script>\n'
    yield tail


def render_page(title: str, sources: list[Source], page_size: int = PAGE_SIZE) -> str:
    """The whole page as one string (`page_chunks`)."""
    return "".join(page_chunks(title, sources, page_size))


def write_view(run_dir: Path, out: Path | None = None, page_size: int = PAGE_SIZE) -> Path:
    """Write the viewer page of `run_dir` to `out` (default `<run_dir>/view.html`); returns its path."""
    run_dir = Path(run_dir)
    sources = run_sources(run_dir)
    out = Path(out) if out is not None else run_dir / "view.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        f.writelines(page_chunks(f"policyflow · {run_dir.resolve().name}", sources, page_size))
    return out
