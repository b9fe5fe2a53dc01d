"""Per-segment sampling policies: a request switches its policy in the middle of a sequence.

GRPO-ATS (Thyme, arXiv 2508.11630) samples reasoning text at the run's temperature and code
greedily. A request carries `SegmentPolicy(open, close, temperature, top_p, top_k)` rules
(`SamplingParams.segment_policies`); the engine watches the decoded completion, and once the
text holds `open` the following tokens are drawn from the rule's policy, until the text
holds `close`; then the request's own policy again. Each token records the policy it was
actually drawn from (`Sample.policies`), which is what the trainer recomputes.

The switch takes effect for the token after the one that completes the marker. A token that
straddles a marker (it completes `open` or `close`, whatever else its text holds) was drawn
under the policy in force before the switch, and is recorded with it: the tokens spelling
`<code>` are text, the tokens spelling `</code>` are code. Exactness never depends on where a
switch falls, since every token carries the policy it came from.

Markers are matched in the decoded text (skip_special_tokens, like stop strings), each new
stretch of text scanned once (a match may start up to len(marker) - 1 characters before it).
Inside one segment only its own `close` is looked for (no nesting); outside, the `open` that
completes first wins (ties: the first rule). A request starts outside every segment unless
`Request.text_before` (the completion so far of a request resumed after an abort) ends inside one.

Cost: the engine decodes a row's text only at steps whose new token could complete a
marker it is waiting for: a token whose own text holds the marker's last character
(`watched_tokens`; sound when that character is non-whitespace ASCII, which a piece of
byte-level or sentencepiece vocabulary spells alone; other markers are checked at every step).
The watch lists are built once per engine and rule set, from every token's own text (one
decode of the vocabulary, the first time a request has segment policies).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

from policyflow.types import TokenPolicy


@dataclass(frozen=True)
class SegmentPolicy:
    """Text between `open` and `close` is sampled at (temperature, top_p, top_k); 0 = greedy."""

    open: str
    close: str
    temperature: float
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.open or not self.close:
            raise ValueError(f"a segment policy needs non-empty open and close markers, got {self.open!r} and {self.close!r}")
        if self.open == self.close:
            raise ValueError(f"a segment policy's open and close markers must differ (both {self.open!r}): one marker cannot say where a segment starts and where it ends")
        if self.temperature < 0:
            raise ValueError(f"segment policy temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"segment policy top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"segment policy top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def policy(self) -> TokenPolicy:
        return TokenPolicy(float(self.temperature), float(self.top_p), int(self.top_k))


class _EveryToken:
    """The watch list of a marker whose last character cannot be trusted to show in a token's own text: every token."""

    def __contains__(self, token: object) -> bool:
        return True


EVERY_TOKEN = _EveryToken()
NO_TOKEN: frozenset[int] = frozenset()  # the watch list of a row with no segment policies


def watched_tokens(pieces: Sequence[str], marker: str, vocab_size: int = 0) -> Container[int]:
    """Ids of the tokens whose own text (`pieces[id]`) holds `marker`'s last character: the only
    tokens that can complete it (plus every id from len(pieces) to `vocab_size`, which the
    tokenizer does not name). `EVERY_TOKEN` when that character cannot be trusted to show in a
    piece (whitespace, non-ASCII)."""
    last = marker[-1]
    if not last.isascii() or last.isspace():
        return EVERY_TOKEN
    return frozenset(i for i, piece in enumerate(pieces) if last in piece) | frozenset(range(len(pieces), vocab_size))


@dataclass(frozen=True)
class SegmentWatch:
    """The tokens that may complete a marker a row waits for: outside every segment (any open
    marker), and inside the segment of rule k (its close marker). One per rule set, cached by the engine."""

    outside: Container[int]
    close: tuple[Container[int], ...]

    @classmethod
    def of(cls, rules: Sequence[SegmentPolicy], pieces: Sequence[str], vocab_size: int) -> SegmentWatch:
        opens = [watched_tokens(pieces, r.open, vocab_size) for r in rules]
        outside = EVERY_TOKEN if any(w is EVERY_TOKEN for w in opens) else frozenset().union(*opens)
        return cls(outside, tuple(watched_tokens(pieces, r.close, vocab_size) for r in rules))


class SegmentScanner:
    """One row's state: which segment it is in and how far its text has been scanned."""

    def __init__(self, rules: Sequence[SegmentPolicy], base: TokenPolicy, watch: SegmentWatch, text_before: str = "") -> None:
        self.rules, self.base, self.watch = tuple(rules), base, watch
        self.before = text_before
        self.inside: int | None = None  # index of the rule whose segment the row is in
        self.settled = 0  # text before this offset can hold no new marker start
        self.checked = 0  # length of the text at the last scan
        if text_before:
            self.scan("")

    @property
    def policy(self) -> TokenPolicy:
        """The policy the next token is drawn from."""
        return self.base if self.inside is None else self.rules[self.inside].policy

    @property
    def watching(self) -> Container[int]:
        """The tokens that, just appended, could complete the marker the row waits for."""
        return self.watch.outside if self.inside is None else self.watch.close[self.inside]

    def scan(self, text: str) -> bool:
        """Read the completion's decoded `text` (everything so far); True when the row changed segment."""
        full = self.before + text
        start = self.inside
        while True:
            if self.inside is None:
                best: tuple[int, int] | None = None  # (end of the match, rule index)
                for k, rule in enumerate(self.rules):
                    at = full.find(rule.open, max(self.settled, self.checked - len(rule.open) + 1))
                    if at >= 0 and (best is None or at + len(rule.open) < best[0]):
                        best = (at + len(rule.open), k)
                if best is None:
                    break
                self.settled, self.inside = best
            else:
                close = self.rules[self.inside].close
                at = full.find(close, max(self.settled, self.checked - len(close) + 1))
                if at < 0:
                    break
                self.settled, self.inside = at + len(close), None
        self.checked = len(full)
        return self.inside != start
