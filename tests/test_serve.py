"""`policyflow serve` (issue 19 §2): the official `openai` client against a live uvicorn server on a
free port, serving tiny models saved with save_pretrained (so the from_pretrained path loads
them), and `RemoteGenerator` against it, compared with the local `AsyncEngine`.

The chat model is the tiny model with a chat template, trained in the fixture to answer one chat
(a system message, the `search` tool) with a Hermes tool call, so that `tool_calls` parsing runs
on real engine output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

from policyflow import serve
from policyflow.config import load_config
from policyflow.engine import AsyncEngine, SamplingParams, generate_blocking
from policyflow.engine.openai_schema import choice_seed
from policyflow.engine.remote import RemoteError, RemoteGenerator
from policyflow.lora import attach_lora, load_merged
from policyflow.model import build_tiny, load_pretrained, save_pretrained
from policyflow.tokens import render_messages
from tests.conftest import eventually

SIZES = {"hidden_size": 32, "num_layers": 2, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1}
CHAT = (
    "{% if tools %}[tools]{{ tools | tojson }}<eos>\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
SEARCH = {"type": "function", "function": {"name": "search", "description": "look a name up", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
CHAT_MESSAGES = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Capital of Zorvia?"}]
TOOL_TURN = '<tool_call>{"name": "search", "arguments": {"query": "Zorvia"}}</tool_call>'


@contextlib.contextmanager
def live(app):
    """`app` on uvicorn in a background thread, on a free port of 127.0.0.1; yields the base URL with /v1."""
    sock = serve.bound_socket("127.0.0.1", 0)
    server = serve.server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert eventually(lambda: server.started or not thread.is_alive())
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    model, tokenizer = build_tiny(seed=0, **SIZES)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("plain") / "model")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A tiny chat-template model that answers CHAT_MESSAGES (with the search tool) by TOOL_TURN."""
    torch.manual_seed(0)
    model, tokenizer = build_tiny(seed=0, hidden_size=64, num_layers=2, intermediate_size=128, num_heads=2, num_kv_heads=1)
    tokenizer.chat_template = CHAT
    prompt = render_messages(tokenizer, CHAT_MESSAGES, True, tools=[SEARCH])
    target = tokenizer(TOOL_TURN, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], torch.tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return save_pretrained(model.eval(), tokenizer, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def plain(plain_dir):
    """(base URL, model name, local AsyncEngine on the same folder, tokenizer, the served app)."""
    app = serve.served_app(plain_dir)
    model, tokenizer = load_pretrained(plain_dir)
    with live(app) as url:
        yield url, str(plain_dir), AsyncEngine(model.eval(), tokenizer), tokenizer, app


@pytest.fixture(scope="module")
def chat(chat_dir):
    with live(serve.served_app(chat_dir)) as url:
        yield url, str(chat_dir), load_pretrained(chat_dir)[1]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def local(engine: AsyncEngine, prompt_ids, **params):
    return generate_blocking(engine, [prompt_ids], SamplingParams(**params))[0]


def extra(choice, name: str):
    return choice.model_extra[name]


def assert_same_logprobs(got, want) -> None:
    assert len(got) == len(want)
    assert max((abs(a - b) for a, b in zip(got, want)), default=0.0) < 1e-5


def test_models_lists_the_folder_with_its_context(plain) -> None:
    url, name, *_ = plain
    models = client(url).models.list().data
    assert [m.id for m in models] == [name] and models[0].model_extra["max_model_len"] == 512


def test_completions_text_and_token_id_prompts_return_the_engines_ids_and_logprobs(plain) -> None:
    url, name, engine, tokenizer, _ = plain
    ids_a, ids_b = tokenizer("12+7=")["input_ids"], tokenizer("3*4=")["input_ids"]
    want_a, want_b = (local(engine, p, temperature=0.0, max_new_tokens=12) for p in (ids_a, ids_b))
    api = client(url)
    for prompt in ("12+7=", ids_a):
        choice = api.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, logprobs=1).choices[0]
        assert extra(choice, "prompt_token_ids") == ids_a and extra(choice, "token_ids") == list(want_a.token_ids)
        assert choice.text == want_a.text and choice.finish_reason == "length"
        assert_same_logprobs(choice.logprobs.token_logprobs, want_a.logprobs)
        assert choice.logprobs.tokens == tokenizer.batch_decode([[t] for t in want_a.token_ids])
    batch = api.completions.create(model=name, prompt=[ids_a, ids_b], max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [extra(c, "token_ids") for c in batch.choices] == [list(want_a.token_ids), list(want_b.token_ids)]
    assert batch.usage.prompt_tokens == len(ids_a) + len(ids_b) and batch.usage.completion_tokens == 24


def test_n_choices_with_a_seed_are_reproducible_and_equal_seeded_engine_samples(plain) -> None:
    url, name, engine, tokenizer, _ = plain
    ids = tokenizer("12+7=")["input_ids"]
    api = client(url)
    first, again = (api.completions.create(model=name, prompt=ids, n=3, seed=11, max_tokens=16, temperature=1.0, logprobs=1) for _ in range(2))
    assert [extra(c, "token_ids") for c in first.choices] == [extra(c, "token_ids") for c in again.choices]
    assert len({tuple(extra(c, "token_ids")) for c in first.choices}) == 3  # each choice its own seed
    for i, choice in enumerate(first.choices):
        want = local(engine, ids, temperature=1.0, max_new_tokens=16, seed=choice_seed(11, i))
        assert extra(choice, "token_ids") == list(want.token_ids) and choice.text == want.text
        assert_same_logprobs(choice.logprobs.token_logprobs, want.logprobs)


def test_a_stop_string_ends_the_text_without_being_in_it_and_the_ids_stay_exact(plain) -> None:
    url, name, engine, tokenizer, _ = plain
    ids = tokenizer("Hello")["input_ids"]
    free = local(engine, ids, temperature=1.0, max_new_tokens=40, seed=3)
    stop = free.text[5:7]
    want = local(engine, ids, temperature=1.0, max_new_tokens=40, seed=3, stop=(stop,))
    assert want.finish_reason == "stop" and want.text.endswith(stop)
    choice = client(url).completions.create(model=name, prompt=ids, max_tokens=40, temperature=1.0, seed=3, stop=[stop]).choices[0]
    assert choice.text == free.text[: free.text.find(stop)] and choice.finish_reason == "stop"
    assert extra(choice, "stop_reason") == stop and extra(choice, "token_ids") == list(want.token_ids)


def test_streamed_deltas_add_up_to_the_unstreamed_completion(plain) -> None:
    url, name, engine, tokenizer, _ = plain
    api = client(url)
    ids = tokenizer("Hello")["input_ids"]
    stop = local(engine, ids, temperature=1.0, max_new_tokens=40, seed=5).text[9:11]
    for kwargs in ({}, {"stop": [stop]}):
        wholes = api.completions.create(model=name, prompt="Hello", max_tokens=40, seed=5, temperature=1.0, logprobs=1, n=2, **kwargs).choices
        events = list(api.completions.create(model=name, prompt="Hello", max_tokens=40, seed=5, temperature=1.0, logprobs=1, n=2, stream=True,
                                             stream_options={"include_usage": True}, **kwargs))
        assert events[-1].choices == [] and events[-1].usage.completion_tokens == sum(len(extra(w, "token_ids")) for w in wholes)
        for whole in wholes:
            choices = [e.choices[0] for e in events[:-1] if e.choices[0].index == whole.index]
            assert "".join(c.text for c in choices) == whole.text
            assert sum((extra(c, "token_ids") for c in choices), []) == extra(whole, "token_ids")
            assert sum((c.logprobs.token_logprobs for c in choices), []) == whole.logprobs.token_logprobs
            assert extra(choices[0], "prompt_token_ids") == ids and choices[-1].finish_reason == whole.finish_reason
            assert [c.finish_reason for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert wholes[0].finish_reason == "stop" and wholes[0].text != wholes[1].text


def test_chat_with_a_system_message_and_tools_returns_tool_calls(chat) -> None:
    url, name, tokenizer = chat
    api = client(url)
    reply = api.chat.completions.create(model=name, messages=CHAT_MESSAGES, tools=[SEARCH], temperature=0, logprobs=True)
    choice = reply.choices[0]
    assert extra(choice, "prompt_token_ids") == render_messages(tokenizer, CHAT_MESSAGES, True, tools=[SEARCH])
    assert tokenizer.decode(extra(choice, "token_ids")) == TOOL_TURN + "<eos>"
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "search" and json.loads(call.function.arguments) == {"query": "Zorvia"}
    assert [c.token for c in choice.logprobs.content] == tokenizer.batch_decode([[t] for t in extra(choice, "token_ids")])
    # The tool's answer goes back as a tool message after the assistant's call; the template renders it.
    follow = CHAT_MESSAGES + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "Quelm"}]
    after = api.chat.completions.create(model=name, messages=follow, tools=[SEARCH], temperature=0, max_tokens=4).choices[0]
    tail = tokenizer("[tool]Quelm<eos>\n[assistant]", add_special_tokens=False)["input_ids"]
    assert extra(after, "prompt_token_ids")[-len(tail):] == tail
    # tool_choice "none": the same turn is plain text.
    plain_turn = api.chat.completions.create(model=name, messages=CHAT_MESSAGES, tools=[SEARCH], temperature=0, tool_choice="none").choices[0]
    assert plain_turn.message.content == TOOL_TURN and not plain_turn.message.tool_calls and plain_turn.finish_reason == "stop"


def test_chat_streaming_gives_the_same_tool_calls_and_text(chat) -> None:
    url, name, _ = chat
    events = list(client(url).chat.completions.create(model=name, messages=CHAT_MESSAGES, tools=[SEARCH], temperature=0, stream=True))
    deltas = [e.choices[0].delta for e in events]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == ""
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [(0, "search", {"query": "Zorvia"})]
    assert events[-1].choices[0].finish_reason == "tool_calls"
    text = "".join(d.content or "" for e in client(url).chat.completions.create(
        model=name, messages=CHAT_MESSAGES, tools=[SEARCH], temperature=0, stream=True, tool_choice="none") for d in [e.choices[0].delta])
    assert text == TOOL_TURN


BAD = [  # (endpoint, body, status, param)
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 600}, 400, "max_tokens"),  # 1 + 600 > the 512-token context
    ("completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("completions", {"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("completions", {"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ("completions", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": 7}, 400, "prompt"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2, "logprobs": True}, 400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{e}-{p}-{i}" for i, (e, _, _, p) in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(plain, endpoint, body, status, param) -> None:
    url, name, *_ = plain
    response = httpx.post(f"{url}/{endpoint}", json={"model": name, **body}, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and "\n" not in error["message"]
    assert client(url).completions.create(model=name, prompt="1+1=", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_malformed_json_and_the_official_clients_errors(plain) -> None:
    url, name, *_ = plain
    for raw in (b'{"model": ', b"[1, 2]", b"not json"):
        response = httpx.post(f"{url}/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    api = client(url)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=name, prompt="x", max_tokens=-3)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-nothing", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(f"{url}/no/such/path", timeout=60).json()["error"]["code"] == "not_found"
    assert api.completions.create(model=name, prompt="1+1=", max_tokens=2).usage.completion_tokens == 2


def test_remote_generator_reproduces_the_local_engine(plain) -> None:
    url, name, engine, tokenizer, _ = plain
    remote = RemoteGenerator(url)
    assert remote.model == name and remote.max_positions == 512 and remote.version == 0
    ids = tokenizer("12+7=")["input_ids"]
    stop = local(engine, ids, temperature=1.0, max_new_tokens=30, seed=9).text[4:6]
    for params in (
        SamplingParams(temperature=0.0, max_new_tokens=24),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=24, seed=9),
        SamplingParams(temperature=1.0, max_new_tokens=30, seed=9, stop=(stop,)),
        SamplingParams(temperature=1.0, max_new_tokens=30, seed=2, stop_token_ids=(83, 84)),
    ):
        got = asyncio.run(remote.generate(ids, params))
        want = local(engine, ids, **{f: getattr(params, f) for f in ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop", "stop_token_ids")})
        assert (got.token_ids, got.finish_reason, got.text, got.versions, got.policies, got.prompt_ids) == (
            want.token_ids, want.finish_reason, want.text, want.versions, want.policies, want.prompt_ids)
        assert_same_logprobs(got.logprobs, want.logprobs)

        async def streamed(params=params):
            return [chunk async for chunk in remote.stream(ids, params)]

        chunks = asyncio.run(streamed())
        assert chunks[-1].sample == got and "".join(c.text for c in chunks) == got.text
        assert sum((c.token_ids for c in chunks), ()) == got.token_ids
    with pytest.raises(RemoteError, match="does not serve model 'other'"):
        RemoteGenerator(url, "other")
    with pytest.raises(RemoteError, match="HTTP 400.*context length"):
        asyncio.run(remote.generate(ids, SamplingParams(max_new_tokens=510)))


def test_a_client_that_disconnects_cancels_its_request(plain) -> None:
    """Streamed or not, a request whose client goes away leaves the engine's batch long before its 500 tokens."""
    url, name, _, _, app = plain
    engine = app.state.server.generator
    body = {"model": name, "prompt": "x", "max_tokens": 500, "ignore_eos": True}
    host, port = url.split("//")[1].split("/")[0].split(":")
    for stream in (True, False):
        start = engine.stats["steps"]
        payload = json.dumps({**body, "stream": stream}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert eventually(lambda: engine.num_in_flight == 1)
        sock.close()
        assert eventually(lambda: engine.num_in_flight == 0)
        assert engine.stats["steps"] - start < 450  # it left the batch: not all 500 tokens were decoded


def test_a_lora_checkpoint_folder_is_served_merged(tmp_path: Path) -> None:
    model, tokenizer = build_tiny(seed=1, **SIZES)
    base = save_pretrained(model, tokenizer, tmp_path / "base")
    lora = attach_lora(load_pretrained(base)[0], load_config(None, ["model.lora.rank=4"]).model.lora, str(base.resolve()))
    with torch.no_grad():
        for pname, p in lora.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.5)
    adapter = save_pretrained(lora, tokenizer, tmp_path / "step-1")
    merged = AsyncEngine(load_merged(adapter)[0].eval(), tokenizer)
    ids = tokenizer("12+7=")["input_ids"]
    want = local(merged, ids, temperature=0.0, max_new_tokens=16)
    base_sample = local(AsyncEngine(load_pretrained(base)[0].eval(), tokenizer), ids, temperature=0.0, max_new_tokens=16)
    with live(serve.served_app(adapter)) as url:
        choice = client(url).completions.create(model=str(adapter), prompt=ids, max_tokens=16, temperature=0, logprobs=1).choices[0]
    assert extra(choice, "token_ids") == list(want.token_ids)
    assert_same_logprobs(choice.logprobs.token_logprobs, want.logprobs)
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, base_sample.logprobs)) > 1e-3  # the adapter is in


def test_the_policyflow_serve_command_line(plain_dir: Path) -> None:
    """`policyflow serve --model DIR --host 127.0.0.1 --port P` as outside checks start it; SIGTERM stops it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "policyflow", "serve", "--model", str(plain_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            return proc.poll() is not None

        assert eventually(up, guard_s=120) and proc.poll() is None, proc.stderr.read().decode() if proc.poll() is not None else ""
        reply = client(f"http://127.0.0.1:{port}/v1").completions.create(model=str(plain_dir), prompt="1+1=", max_tokens=3)
        assert len(extra(reply.choices[0], "token_ids")) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/v1".encode() in out


def test_accepted_connections_have_tcp_nodelay() -> None:
    """A reply goes out in two writes (head, body); without TCP_NODELAY each one waits for the
    client's delayed ACK (~40 ms). asyncio sets it only on sockets made as IPPROTO_TCP."""
    seen: list[int] = []

    async def main() -> None:
        async def accepted(reader, writer) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=serve.bound_socket("127.0.0.1", 0))
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen == [1]


# -- review of issue 19: fake generators behind the app ------------------------------------------


class Fake:
    """A Generator answering every call with one token (5), recording each call's params;
    `error`: what /health reports (an AsyncEngine's failed decode loop)."""

    version = 0

    def __init__(self, max_positions: int = 100, stream_sample: bool = True):
        self.max_positions, self.stream_sample, self.params, self.error = max_positions, stream_sample, [], None

    async def generate(self, prompt_ids, params=None, *, request_id=None):
        from policyflow.types import Sample

        self.params.append(params)
        return Sample(tuple(prompt_ids), (5,), (-0.1,), (0,), "length", "x", ())

    async def stream(self, prompt_ids, params=None, *, request_id=None):
        from policyflow.engine import Chunk

        sample = await self.generate(prompt_ids, params)
        yield Chunk((5,), (-0.1,), "x", sample if self.stream_sample else None)

    def cancel(self, request_id):
        return False


def fake_app(generator, **kwargs):
    from policyflow.engine.openai_api import build_app
    from policyflow.model import build_char_tokenizer

    return build_app(generator, build_char_tokenizer(), "fake", False, **kwargs)


def sse(response) -> list:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]" for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_stream_whose_budget_is_spent_ends_with_an_empty_length_choice() -> None:
    """SeededCalls with its budget spent yields one final chunk (an empty Sample, "length"), and a
    generator whose stream ends without its Sample gets an error event: no stream hangs."""
    from policyflow.evaluate.episodes import SeededCalls

    spent = SeededCalls(Fake(), (0, "heldout", 0, 0), budget=1)
    asyncio.run(spent.generate([1, 2], SamplingParams(max_new_tokens=4)))  # spends the budget
    body = {"model": "fake", "prompt": [1, 2], "max_tokens": 4, "stream": True}
    with live(fake_app(spent)) as url:
        events = sse(httpx.post(f"{url}/completions", json=body, timeout=30))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["token_ids"] == []
    with live(fake_app(Fake(stream_sample=False))) as url:
        events = sse(httpx.post(f"{url}/completions", json=body, timeout=30))
    assert events[0]["choices"][0]["text"] == "x" and "without its last chunk" in events[-1]["error"]["message"] and len(events) == 2


def test_max_tokens_defaults_to_the_servers_cut_to_the_room_left_and_health_reports_a_failed_engine() -> None:
    fake = Fake(max_positions=5000)
    chat_body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with live(fake_app(fake)) as url:
        httpx.post(f"{url}/chat/completions", json=chat_body, timeout=30).raise_for_status()
        httpx.post(f"{url}/completions", json={"model": "fake", "prompt": [1, 2, 3]}, timeout=30).raise_for_status()
        assert [p.max_new_tokens for p in fake.params] == [1024, 1024]  # not the 5000-token context left, not 16
        root = url[: -len("/v1")]
        assert httpx.get(f"{root}/health", timeout=30).json() == {"status": "ok"}
        fake.error = RuntimeError("CUDA out of memory")
        health = httpx.get(f"{root}/health", timeout=30)
        assert health.status_code == 503 and health.json() == {"status": "error", "error": "RuntimeError: CUDA out of memory"}
    small = Fake(max_positions=10)
    with live(fake_app(small, max_tokens=8)) as url:
        httpx.post(f"{url}/completions", json={"model": "fake", "prompt": [1, 2, 3, 4]}, timeout=30).raise_for_status()
        httpx.post(f"{url}/completions", json={"model": "fake", "prompt": [1]}, timeout=30).raise_for_status()
    assert [p.max_new_tokens for p in small.params] == [6, 8]  # the room left, else --max-tokens


def test_choice_seeds_never_repeat_across_requests() -> None:
    """Choice 0 keeps the request's seed (= SamplingParams(seed=s) locally); the others are hashed,
    so choice 1 of seed 5 is not choice 0 of seed 6."""
    from policyflow.engine.openai_schema import choice_seed

    assert [choice_seed(s, 0) for s in (0, 5, 2**64 - 1)] == [0, 5, 2**64 - 1]
    seeds = [choice_seed(s, i) for s in range(200) for i in range(8)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**64 for x in seeds)


def test_remote_generator_leaves_no_sockets_open_across_blocking_runs() -> None:
    """Each blocking run's loop closes its HTTP client at shutdown; `close()` closes what is left."""
    from policyflow.engine import run_blocking

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with live(fake_app(Fake())) as url:
        generator = RemoteGenerator(url)
        before = fds()
        async def calls():
            return await asyncio.gather(*(generator.generate([1, 2], SamplingParams(max_new_tokens=1)) for _ in range(20)))

        for _ in range(5):
            assert len(run_blocking(calls())) == 20
            assert generator._clients == {}
        assert eventually(lambda: fds() <= before)  # the server's ends close too once the clients have closed theirs
        generator.close()
