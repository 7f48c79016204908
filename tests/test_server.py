"""The OpenAI-compatible server: the official openai client, raw HTTP for bad input, concurrency, walk-aways.

Every server here is uvicorn in a thread of this process, bound to 127.0.0.1 on a free port; every
loop is bounded in count and time.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import krasis_run
from krasis_run.server import KrasisServer, Penalties, ServerThread, model_name_for

KEY = "sk-test-key"
TEXT = "Grüße, naïve café — 日本語のテキスト。 emoji 🙂🚀"


@pytest.fixture(scope="module")
def rt(tiny_per_expert):
    return krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)


@pytest.fixture(scope="module")
def model_name(tiny_per_expert):
    return model_name_for(tiny_per_expert.artifact("q4", "q8"))


@pytest.fixture(scope="module")
def server(rt, model_name):
    with ServerThread(KrasisServer(rt, model_name, api_key=KEY, max_queue=32)) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def chat_ids(rt, content: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return rt.tokenizer.encode(rt.tokenizer.apply_chat_template(messages))


def expected(rt, ids: list[int], n: int, **kw) -> tuple[str, list[int]]:
    tokens = list(rt.generate(ids, max_new_tokens=n, temperature=0.0, **kw))
    return rt.tokenizer.decode(tokens), tokens


# ------------------------------------------------------------------ the openai client


def test_models_and_health(client, server, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == model_name


def test_chat_completion_matches_runtime(client, rt, model_name):
    text, tokens = expected(rt, chat_ids(rt, "hello", system="be brief"), 12)
    r = client.chat.completions.create(model=model_name, max_tokens=12, temperature=0,
                                       messages=[{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hello"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert r.usage.prompt_tokens == len(chat_ids(rt, "hello", system="be brief"))
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client, rt, model_name):
    text, tokens = expected(rt, chat_ids(rt, TEXT), 40)
    stream = client.chat.completions.create(model=model_name, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": TEXT}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if len(tokens) == 40 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client, rt, model_name):
    ids = rt.tokenizer.encode("def parse(")
    text, tokens = expected(rt, ids, 16)
    r = client.completions.create(model=model_name, prompt="def parse(", max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    parts = list(client.completions.create(model=model_name, prompt="def parse(", max_tokens=16, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == text
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == text


def test_stop_strings_match_text_not_tokens(client, rt, model_name):
    ids = rt.tokenizer.encode("x")
    full, _ = expected(rt, ids, 24, stop_token_ids=set())
    assert len(full) > 6
    stop = full[3:6]
    for stream in (False, True):
        r = client.completions.create(model=model_name, prompt="x", max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_length_finish_and_seeded_sampling(client, model_name):
    def sample(seed):
        return client.completions.create(model=model_name, prompt="import", max_tokens=6, temperature=1.0,
                                         top_p=0.9, seed=seed, extra_body={"top_k": 50}).choices[0]

    a, b = sample(7), sample(7)
    assert a.text == b.text
    one = client.completions.create(model=model_name, prompt="import", max_tokens=1, temperature=0).choices[0]
    assert one.finish_reason in ("length", "stop")


def test_penalties_apply_to_logits(client, rt, model_name):
    ids = rt.tokenizer.encode("aaaa")
    penalties = Penalties(presence=1.5, frequency=0.5)

    def processor(logits):
        return penalties(logits)

    tokens = []
    for t in rt.generate(ids, max_new_tokens=20, temperature=0.0, logits_processor=processor):
        tokens.append(t)
        penalties.add(t)
    r = client.completions.create(model=model_name, prompt="aaaa", max_tokens=20, temperature=0,
                                  presence_penalty=1.5, frequency_penalty=0.5)
    assert r.choices[0].text == rt.tokenizer.decode(tokens)
    plain, _ = expected(rt, ids, 20)
    assert r.choices[0].text != plain  # on this model the penalties change the greedy path


def test_penalty_arithmetic():
    p = Penalties(presence=0.5, frequency=0.25)
    logits = torch.zeros(6)
    for t in (1, 1, 4):
        p.add(t)
    out = p(logits)
    assert out.tolist() == [0.0, -1.0, 0.0, 0.0, -0.75, 0.0]


# ------------------------------------------------------------------ errors, through the client and raw HTTP


def test_client_errors(client, server, model_name):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=model_name, prompt="word " * 2000, max_tokens=4)


def post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def chat_body(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


@pytest.mark.parametrize("case,status,needle", [
    ("malformed json", 400, "not valid JSON"),
    ("array body", 400, "JSON object"),
    ("no model", 400, "'model'"),
    ("no messages", 400, "'messages'"),
    ("empty messages", 400, "non-empty"),
    ("bad role", 400, "role"),
    ("content number", 400, "content"),
    ("max_tokens string", 400, "max_tokens"),
    ("max_tokens negative", 400, "max_tokens"),
    ("max_tokens zero", 400, "max_tokens"),
    ("max_tokens absurd", 400, "max_tokens"),
    ("max_tokens bool", 400, "max_tokens"),
    ("temperature string", 400, "temperature"),
    ("temperature high", 400, "temperature"),
    ("top_p high", 400, "top_p"),
    ("stop number", 400, "stop"),
    ("n two", 400, "'n'"),
    ("penalty range", 400, "presence_penalty"),
    ("stream string", 400, "stream"),
    ("unknown model", 404, "does not exist"),
    ("no key", 401, "API key"),
    ("wrong key", 401, "API key"),
    ("too long", 400, "context length"),
])
def test_bad_requests_get_openai_errors(server, model_name, case, status, needle):
    m = model_name
    body, raw, key, path = chat_body(m), None, KEY, "/v1/chat/completions"
    if case == "malformed json":
        raw = b'{"model": "x", "messages": ['
    elif case == "array body":
        body = [chat_body(m)]
    elif case == "no model":
        body.pop("model")
    elif case == "no messages":
        body.pop("messages")
    elif case == "empty messages":
        body["messages"] = []
    elif case == "bad role":
        body["messages"] = [{"role": "wizard", "content": "hi"}]
    elif case == "content number":
        body["messages"] = [{"role": "user", "content": 5}]
    elif case.startswith("max_tokens"):
        body["max_tokens"] = {"string": "10", "negative": -1, "zero": 0, "absurd": 10**12, "bool": True}[
            case.split()[1]]
    elif case == "temperature string":
        body["temperature"] = "hot"
    elif case == "temperature high":
        body["temperature"] = 9.5
    elif case == "top_p high":
        body["top_p"] = 1.5
    elif case == "stop number":
        body["stop"] = [1, 2]
    elif case == "n two":
        body["n"] = 2
    elif case == "penalty range":
        body["presence_penalty"] = 3.0
    elif case == "stream string":
        body["stream"] = "yes"
    elif case == "unknown model":
        body["model"] = "gpt-4o"
    elif case == "no key":
        key = None
    elif case == "wrong key":
        key = "sk-nope"
    elif case == "too long":
        path, body = "/v1/completions", {"model": m, "prompt": [5] * 600, "max_tokens": 1}
    before = httpx.get(server.url + "/health", timeout=10).json()["served"]
    r = post(server, path, body, key=key, raw=raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health", timeout=10).json()["served"] == before  # never reached the engine
    ok = post(server, "/v1/chat/completions", chat_body(m))  # and the server keeps serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_fields_ignored_and_routes(server, model_name):
    r = post(server, "/v1/chat/completions", chat_body(model_name, frobnicate={"x": 1}, user="u1", tools=None))
    assert r.status_code == 200
    missing = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_content_parts_and_sse_wire_format(server, model_name, rt):
    body = {"model": model_name, "max_tokens": 5, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hel"},
                                                      {"type": "text", "text": "lo"}]}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected(rt, chat_ids(rt, "hello"), 5)[0]


class ScriptedRuntime:
    """The real runtime, except that generate yields a fixed token sequence (here: multi-byte text)."""

    def __init__(self, rt, tokens: list[int]):
        self.rt, self.tokens = rt, tokens

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def generate(self, token_ids, max_new_tokens=256, **kwargs):
        yield from self.tokens[:max_new_tokens]


def test_streaming_is_multibyte_safe(rt, model_name):
    tokens = rt.tokenizer.encode(TEXT)
    assert len(tokens) > len(TEXT)  # byte-level pieces: characters span several tokens
    with ServerThread(KrasisServer(ScriptedRuntime(rt, tokens), model_name)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(c.chat.completions.create(model=model_name, max_tokens=len(tokens) + 5, stream=True,
                                                messages=[{"role": "user", "content": "x"}]))
        deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
        assert "".join(deltas) == TEXT and len(deltas) > 10
        assert not any("\ufffd" in d for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "stop"
        cut = c.completions.create(model=model_name, prompt="x", max_tokens=len(tokens) + 5, stop="テキ")
        assert cut.choices[0].text == TEXT[: TEXT.index("テキ")] and cut.choices[0].finish_reason == "stop"
        short = c.completions.create(model=model_name, prompt="x", max_tokens=len(tokens) - 1)
        assert short.choices[0].finish_reason == "length"
        assert short.choices[0].text == rt.tokenizer.decode(tokens[:-1])


# ------------------------------------------------------------------ one engine, many clients


def test_sixteen_concurrent_clients_get_correct_answers(server, rt, model_name):
    prompts = [f"def f{i}(x):" for i in range(16)]
    want = {p: expected(rt, rt.tokenizer.encode(p), 10)[0] for p in prompts}
    barrier = threading.Barrier(16, timeout=30)

    def ask(i: int) -> tuple[str, str]:
        prompt = prompts[i]
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            barrier.wait()
            if i % 2:
                r = c.completions.create(model=model_name, prompt=prompt, max_tokens=10, temperature=0)
                return prompt, r.choices[0].text
            s = c.completions.create(model=model_name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
            return prompt, "".join(ch.choices[0].text for ch in s)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16), timeout=180))
    assert len(results) == 16
    for prompt, text in results:
        assert text == want[prompt], prompt


class SlowRuntime:
    """The real runtime, slowed to `delay` seconds per token, never stopping at EOS; counts its tokens."""

    def __init__(self, rt, delay: float):
        self.rt, self.delay, self.produced, self.closed = rt, delay, 0, 0

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def generate(self, *args, **kwargs):
        try:
            for token in self.rt.generate(*args, **kwargs, stop_token_ids=set()):
                time.sleep(self.delay)
                self.produced += 1
                yield token
        finally:
            self.closed += 1


@pytest.fixture
def slow_server(rt, model_name):
    slow = SlowRuntime(rt, 0.05)
    with ServerThread(KrasisServer(slow, model_name, max_queue=1)) as s:
        s.slow = slow
        yield s


def long_body(model_name: str, **kw) -> dict:
    return {"model": model_name, "prompt": "x", "max_tokens": 400, "temperature": 0, **kw}


def test_client_walking_away_mid_stream_frees_the_engine(slow_server, model_name):
    slow = slow_server.slow
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", slow_server.url + "/v1/completions", json=long_body(model_name, stream=True)) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break  # and the with-block closes the connection mid-stream
    started = time.monotonic()
    r = httpx.post(slow_server.url + "/v1/completions", json={**long_body(model_name), "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    assert time.monotonic() - started < 5  # 400 tokens at 50 ms would be 20 s
    deadline = time.monotonic() + 10
    while slow.closed < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.closed == 2 and slow.produced < 100


def test_non_streaming_client_walking_away_cancels(slow_server, model_name):
    slow = slow_server.slow
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow_server.url + "/v1/completions", json=long_body(model_name), timeout=0.5)
    deadline = time.monotonic() + 10
    while slow.closed < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.closed == 1 and slow.produced < 100


def test_full_queue_gets_429(slow_server, model_name):
    url = slow_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as running, httpx.Client(timeout=30) as waiting:
        with running.stream("POST", url, json=long_body(model_name, stream=True, max_tokens=60)) as r1:
            lines = r1.iter_lines()  # (keep the iterator: dropping it closes the connection)
            next(lines)  # it has the engine now
            results = {}

            def second():
                results["second"] = waiting.post(url, json=long_body(model_name, max_tokens=3))

            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 10
            while httpx.get(slow_server.url + "/health").json()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            third = httpx.post(url, json=long_body(model_name, max_tokens=3), timeout=30)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "queue_full"
            rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
        t.join(timeout=30)
    assert results["second"].status_code == 200
