"""`policyflow view`: the page's data (older and newer episode lines), and the page itself in a real
headless browser (Debian's Chromium, driven by Playwright): paging, filters, one episode's
tokens (trained vs masked, staleness), reward parts, sources, and a real two-step run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policyflow.cli import main
from policyflow.view import PAGE_SIZE, ViewError, read_source, render_page, run_sources, write_view
from tests.conftest import SMALL

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # Debian's; the same variable as scripts/setup_browser.sh
N_TRAIN, STEPS = 120, 6  # 20 episodes per step; every fourth one truncated


def _episode(step: int, i: int, kind: str = "train") -> dict:
    """A two-call search episode: prompt, gen (versions step-2, step-1, step: staleness 2, 1, 0), obs,
    gen whose middle token is masked (loss mask 0)."""
    parts = {"correct": float(i % 2), "format": -0.1 if i % 3 == 0 else 0.05}
    segments = [
        {"kind": "prompt", "turn": None, "text": f"What is {i}+{step}?", "token_ids": [11, 12, 13], "token_texts": ["What is ", f"{i}+{step}", "?"],
         "loss_mask": [0, 0, 0], "logprobs": None, "versions": None},
        {"kind": "gen", "turn": 0, "text": "<search>two</search>", "token_ids": [21, 22, 23], "token_texts": ["<search>", "two", "</search>"],
         "loss_mask": [1, 1, 1], "logprobs": [-0.5, -1.25, -0.125], "versions": [step - 2, step - 1, step]},
        {"kind": "obs", "turn": 0, "text": "[doc] five", "token_ids": [31, 32], "token_texts": ["[doc]", " five"], "loss_mask": [0, 0], "logprobs": None, "versions": None},
        {"kind": "gen", "turn": 1, "text": "<answer>5</answer>", "token_ids": [41, 42, 43], "token_texts": ["<answer>", "5", "</answer>"],
         "loss_mask": [1, 0, 1], "logprobs": [-0.25, 0.0, -0.5], "versions": [step, step, step]},
    ]
    return {
        "kind": kind, "step": step, "version": step, "episode_id": f"{kind}-{step}-{i}", "task_id": f"task-{i % 5}", "prompt": f"What is {i}+{step}?",
        "answer": "5", "reward": sum(parts.values()), "reward_parts": parts, "advantage": 0.5 - i % 2, "status": "truncated" if i % 4 == 3 else "complete",
        "finish_reason": "length" if i % 4 == 3 else "stop", "turns": 2, "tool_calls": 1, "tool_errors": 0, "segments": segments,
        "calls": [{"context": [0], "produced": 1}, {"context": [0, 1, 2], "produced": 3}],
        "steps": [{"calls": [{"tool": "search", "arguments": {"query": "two"}, "error": None}]}, {"answer": "5"}],
    }


# A samples.jsonl line from before issue 19: the episode under "episode", segment texts and token counts, no token ids.
OLD_LINE = {"step": 3, "prompt": "1+1=", "answer": "2", "completion": "2", "reward": 1.0, "finish_reason": "eos", "episode": {
    "status": "complete", "turns": 1, "tool_calls": 0, "tool_errors": 0, "reward_parts": {"correct": 1.0},
    "segments": [{"kind": "prompt", "turn": 0, "text": "1+1=", "tokens": 4, "trained": False}, {"kind": "gen", "turn": 0, "text": "2", "tokens": 1, "trained": True}],
    "calls": [{"context": [0], "produced": 1}], "steps": [{}]}}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def evaluation_note(i: int) -> dict:
    """The extra field of an evaluation's episodes.jsonl line: which set, mode and problem it was."""
    return {"set": "heldout", "mode": "sampled" if i else "greedy", "problem": i}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "viewed"
    per_step = N_TRAIN // STEPS
    _write_jsonl(run / "samples.jsonl", [_episode(1 + n // per_step, n % per_step) for n in range(N_TRAIN)])
    evaluation = [_episode(2, i, kind="eval") | {"eval": evaluation_note(i)} for i in range(7)]
    _write_jsonl(run / "eval" / "001-20250101-000000" / "episodes.jsonl", evaluation)
    return run


# -- the page's data ----------------------------------------------------------------------------


def test_older_lines_and_lines_being_written_are_read(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(OLD_LINE) + "\n" + '{"step": 4, "reward": NaN}\n' + '{"step": 5, "prom')  # the last line still being written
    source = read_source("train", path)
    first, second = source.summaries
    assert (first.step, first.status, first.reward_parts, first.episode_id, first.kind, first.finish_reason) == (3, "complete", {"correct": 1.0}, "samples.jsonl:1", "train", "eos")
    assert first.gen_tokens == 1 and first.max_staleness is None and first.prompt == "1+1="
    assert (second.step, second.reward, second.status, second.finish_reason) == (4, None, "unknown", None)
    assert source.lines == (json.dumps(OLD_LINE), '{"step": 4, "reward": null}')  # verbatim, but NaN (JSON.parse refuses it) as null


def test_new_lines_keep_tokens_and_staleness(run_dir: Path) -> None:
    train, evaluation = run_sources(run_dir)
    assert (train.name, len(train.summaries), evaluation.name, len(evaluation.summaries)) == ("train", N_TRAIN, "eval/001-20250101-000000", 7)
    e = train.summaries[0]
    assert (e.episode_id, e.max_staleness, e.gen_tokens, e.reward_parts, e.status) == ("train-1-0", 2, 6, {"correct": 0.0, "format": -0.1}, "complete")
    assert (evaluation.summaries[0].kind, evaluation.summaries[0].label, e.label) == ("eval", "heldout greedy", "")
    assert json.loads(train.lines[5]) == _episode(1, 5)


def test_bad_lines_and_empty_runs_are_refused_with_their_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "samples.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ViewError, match=r"samples.jsonl:2: an episode line must be a JSON object, got list"):
        run_sources(tmp_path)
    (tmp_path / "samples.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert main(["view", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"policyflow: ViewError: {tmp_path / 'samples.jsonl'}:2: not a JSON line")
    (tmp_path / "samples.jsonl").unlink()
    assert main(["view", str(tmp_path)]) == 1
    assert "holds no samples.jsonl and no eval/*/episodes.jsonl" in capsys.readouterr().err


def test_page_is_self_contained_and_episode_text_cannot_close_its_script(tmp_path: Path) -> None:
    hostile = dict(_episode(1, 0), prompt="</script><script>alert(1)</script><!--")
    _write_jsonl(tmp_path / "samples.jsonl", [hostile])
    page = render_page("t", run_sources(tmp_path))
    assert page.count("</script>") == 3 and "<!--" not in page.split('id="data"')[1]  # the summaries, the page's script, the one episode
    assert not any(ref in page for ref in ("http://", "https://", "<link", " src=", "@import", "url("))


# -- the page in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright (no `playwright install`: no downloads here)."""
    missing = None if CHROMIUM.exists() else f"{CHROMIUM} is missing: run scripts/setup_browser.sh (as root it runs apt-get install -y chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "the playwright package is missing: pip install -e '.[test]'"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that records every request and script error (both must stay local and empty)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    pg.requests, pg.errors = [], []
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()
    assert not pg.errors, pg.errors
    assert all(url.startswith("file://") for url in pg.requests), pg.requests


def _ids(page) -> list[str]:
    return page.locator("#rows td.id").all_inner_texts()


def test_browse_filter_and_open_an_episode(run_dir: Path, page) -> None:
    page.goto(write_view(run_dir).resolve().as_uri())
    assert page.inner_text("#page-info") == f"page 1 of 3 · {N_TRAIN} of {N_TRAIN} episodes"
    seen = []
    for k, expected in enumerate((PAGE_SIZE, PAGE_SIZE, N_TRAIN - 2 * PAGE_SIZE)):  # every episode once, a page at a time
        assert page.locator("#rows tr").count() == expected
        seen += _ids(page)
        if k < 2:
            page.click("#next")
    assert page.is_disabled("#next") and sorted(seen) == sorted(f"train-{1 + n // 20}-{n % 20}" for n in range(N_TRAIN))

    page.select_option("#status", "truncated")
    assert page.inner_text("#page-info") == f"page 1 of 1 · 30 of {N_TRAIN} episodes"
    assert set(page.locator("#rows td.status").all_inner_texts()) == {"truncated"}
    page.select_option("#status", "")
    page.fill("#step-min", "3")
    page.fill("#step-max", "3")
    assert set(page.locator("#rows td.step").all_inner_texts()) == {"3"} and page.locator("#rows tr").count() == 20
    page.select_option("#sort", "reward-desc")
    rewards = [float(r) for r in page.locator("#rows td.reward").all_inner_texts()]
    assert rewards == sorted(rewards, reverse=True) and rewards[0] == pytest.approx(1.05)

    page.fill("#search", "train-3-6")
    page.click("#rows tr >> nth=0")
    assert page.inner_text("#episode h2") == "episode train-3-6"
    assert page.inner_text("#episode .fact-status") == "complete" and page.inner_text("#episode .fact-version") == "3"
    parts = dict(zip(page.locator("#reward-parts .part-name").all_inner_texts(), page.locator("#reward-parts .part-value").all_inner_texts()))
    assert parts == {"correct": "0", "format": "-0.1"}
    first, second = page.locator("#episode .call[data-call='0']"), page.locator("#episode .call[data-call='1']")
    assert first.locator(".context .seg-prompt .tokens").inner_text() == "What is 6+3?"
    assert first.locator(".produced .tokens").inner_text() == "<search>two</search>"
    assert first.locator(".tool-call").inner_text() == 'tool call: search({"query":"two"})'
    assert first.locator(".seg-obs .tokens").inner_text() == "[doc] five"
    assert second.locator(".final-answer").inner_text() == "final answer: 5"

    gen = first.locator(".produced .tok")
    assert [gen.nth(k).get_attribute("data-staleness") for k in range(3)] == ["2", "1", "0"]
    assert gen.nth(0).get_attribute("title") == "token 21 · trained · version 1 · staleness 2 · logprob -0.500"
    answer = second.locator(".produced .tok")
    assert [answer.nth(k).get_attribute("class") for k in range(3)] == ["tok trained stale-0", "tok masked stale-0", "tok trained stale-0"]
    style = lambda loc, prop: loc.evaluate(f"e => getComputedStyle(e)['{prop}']")  # noqa: E731
    assert style(answer.nth(0), "backgroundColor") != style(answer.nth(1), "backgroundColor")  # trained vs masked, visibly
    assert style(first.locator(".seg-prompt .tok").first, "backgroundColor") == style(answer.nth(1), "backgroundColor")
    assert style(gen.nth(0), "boxShadow") != style(gen.nth(2), "boxShadow") == "none"  # stale tokens are marked

    for field in ("#step-min", "#step-max", "#search"):
        page.fill(field, "")
    page.select_option("#sort", "step-asc")
    page.select_option("#source", label="eval/001-20250101-000000 (7)")
    assert page.inner_text("#page-info") == "page 1 of 1 · 7 of 7 episodes" and _ids(page)[0] == "eval-2-0"
    assert page.locator("#rows td.task").all_inner_texts()[:2] == ["task-0 (heldout greedy)", "task-1 (heldout sampled)"]
    page.fill("#search", "greedy")
    assert _ids(page) == ["eval-2-0"]
    page.click("#rows tr >> nth=0")
    assert page.inner_text("#episode .fact-kind") == "eval" and json.loads(page.inner_text("#episode .fact-eval")) == evaluation_note(0)


def test_ten_thousand_episodes_render_one_page_at_a_time(tmp_path: Path, page) -> None:
    run = tmp_path / "big"
    small = {"status": "complete", "segments": [{"kind": "gen", "text": "x", "token_texts": ["x"], "loss_mask": [1], "versions": [0]}]}
    _write_jsonl(run / "samples.jsonl", [dict(small, step=n // 100, episode_id=f"e{n}", reward=n % 10, version=1) for n in range(10_000)])
    page.goto(write_view(run).resolve().as_uri())
    assert page.evaluate("window.viewer.pageSize") == PAGE_SIZE
    assert page.locator("tr").count() == PAGE_SIZE + 1  # the header and one page of rows: the DOM never holds the 10,000
    assert page.inner_text("#page-info") == "page 1 of 200 · 10000 of 10000 episodes"
    page.click("#last")
    assert page.locator("#rows tr").count() == PAGE_SIZE and _ids(page)[-1] == "e9999"
    assert page.locator(".tok").count() == 0  # tokens appear only for an opened episode


def test_older_lines_show_their_text_with_trained_and_masked_segments(tmp_path: Path, page) -> None:
    _write_jsonl(tmp_path / "samples.jsonl", [OLD_LINE])
    page.goto(write_view(tmp_path).resolve().as_uri())
    page.click("#rows tr >> nth=0")
    call = page.locator("#episode .call[data-call='0']")
    prompt, answer = call.locator(".context .seg-prompt .tok"), call.locator(".produced .tok")
    assert (prompt.inner_text(), prompt.get_attribute("class"), answer.inner_text(), answer.get_attribute("class")) == ("1+1=", "tok whole masked", "2", "tok whole trained")
    assert page.inner_text("#episode .fact-reward") == "1" and page.locator("#reward-parts .part-name").all_inner_texts() == ["correct"]


def test_view_of_a_real_two_step_run(tmp_path: Path, jsonl_file: Path, page) -> None:
    """The commands as a user types them (subprocesses: Playwright's sync API holds this thread's event loop)."""
    args = [*SMALL, f"run.output_dir={tmp_path}", "run.name=viewrun", "task.name=jsonl", f"task.path={jsonl_file}",
            "task.reward=tests.rewards_for_tests:dense", "sft.max_steps=0", "run.samples_every=1"]
    policyflow = [sys.executable, "-m", "policyflow"]
    subprocess.run([*policyflow, "train", *args], check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    run = tmp_path / "viewrun"
    done = subprocess.run([*policyflow, "view", str(run)], check=True, capture_output=True, text=True)
    path = Path(done.stdout.strip())
    assert path == run / "view.html"
    lines = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    page.goto(path.resolve().as_uri())
    pages = -(-len(lines) // PAGE_SIZE)
    assert page.inner_text("#page-info") == f"page 1 of {pages} · {len(lines)} of {len(lines)} episodes" and lines
    assert set(page.locator("#rows td.step").all_inner_texts()) == {"1", "2"}
    page.click("#rows tr >> nth=0")
    record = lines[0] | (lines[0].get("episode") or {})
    segments = record["segments"]
    shown = page.locator("#episode .produced .tokens").all_inner_texts()
    assert shown == ["".join(s.get("token_texts") or [s["text"]]) for s in segments if s["kind"] == "gen"] and shown
    assert record["prompt"] in page.locator("#episode .seg-prompt .tokens").first.inner_text()
    assert page.locator("#episode .seg-gen .tok.trained").count() > 0 and page.locator("#episode .seg-prompt .tok.masked").count() > 0
