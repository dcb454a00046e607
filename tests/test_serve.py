"""`tunesmith serve`: the OpenAI client against the chat API (plain and streamed, stop strings,
usage), /v1/classify for text and image runs with dynamic batching, and every malformed request
answered with a 4xx while the server keeps answering. A real uvicorn server on 127.0.0.1 with a
free port; tiny models built in code."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the client starlette and openai use now (httpx successor)
import pytest

import tunesmith
from conftest import make_chat_rows, make_texts, text_config, write_jsonl, write_text_data
from tunesmith.serve import Limits, build_app


@contextlib.contextmanager
def running(app):
    """The app on a real socket (127.0.0.1, a free port), in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        assert t.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-text")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_CACHE", str(root / "cache"))
        cfg = text_config(tiny_model_dir, write_text_data(root / "data"), root / "run", optim={"epochs": 4})
        tunesmith.train(cfg, quiet=True)
    return root / "run"


def test_classify_answers_like_predict_and_batches_concurrent_requests(text_run):
    from tunesmith.predict import load

    texts = [t for t, _ in make_texts(24, seed=7)]
    want = load(text_run).predict(texts)
    app = build_app(text_run, limits=Limits(max_batch=64, window_ms=200))
    with running(app) as url, ThreadPoolExecutor(12) as pool:
        def one(text):
            r = httpx.post(f"{url}/v1/classify", json={"texts": [text]}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["results"][0]

        got = list(pool.map(one, texts))
        several = httpx.post(f"{url}/v1/classify", json={"texts": texts, "model": "run"}, timeout=30).json()
        health = httpx.get(f"{url}/health").json()
    for g, w, s in zip(got, want, several["results"]):
        assert g["label"] == w.label == s["label"]
        assert all(abs(g["probabilities"][k] - v) < 1e-5 for k, v in w.probabilities.items())
    stats = health["batching"]
    assert stats["items"] == 48 and stats["batches"] < 24 + 1  # 24 one-text requests shared forward passes
    assert stats["largest_batch"] > 1


@pytest.fixture(scope="module")
def chat_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama tuned on five question/answer pairs (its greedy answers are words, not noise)."""
    root = tmp_path_factory.mktemp("serve-chat")
    rows = make_chat_rows()
    write_jsonl(root / "train.jsonl", rows * 8)
    write_jsonl(root / "validation.jsonl", rows[:2])  # seen rows: the best weights are the memorised ones
    write_jsonl(root / "test.jsonl", rows[2:])
    cfg = {"task": "causal-lm", "model": str(tiny_llama_dir), "output_dir": str(root / "run"),
           "data": {k: str(root / f"{k}.jsonl") for k in ("train", "validation", "test")},
           "strategy": {"name": "full"}, "optim": {"lr": 5e-3, "batch_size": 4, "epochs": 40, "warmup": 0, "min_steps": 0},
           "train": {"max_length": 64, "seed": 0, "precision": "fp32"}, "lm": {"forgetting": None, "max_new_tokens": 8},
           "eval": {"report": False}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_CACHE", str(root / "cache"))
        tunesmith.train(cfg, quiet=True)
    return root / "run"


def _chat(url, **body):
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_the_openai_client_chats_streams_and_stops(chat_run):
    from openai import OpenAI

    from tunesmith.generate import ChatModel

    name = chat_run.name
    local = ChatModel(chat_run)
    prompt = [{"role": "user", "content": make_chat_rows()[0]["messages"][0]["content"]}]
    want = "".join(local.stream(prompt, max_new_tokens=12, temperature=0))
    assert want == make_chat_rows()[0]["messages"][1]["content"] and local.stopped  # memorised, ends at EOS
    app = build_app(chat_run)
    with running(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [name]
        r = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=12)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == local.last_completion_tokens < 12
        assert r.usage.prompt_tokens == local.last_prompt_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        short = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=3)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
        assert want.startswith(short.choices[0].message.content)
        chunks = list(client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        stop = " link"  # the answer ends before it
        s = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=12, stop=[stop])
        assert s.choices[0].message.content == want[: want.index(stop)] and s.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=12,
                                                  stop=stop, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == want[: want.index(stop)]
        seeded = [client.chat.completions.create(model=name, messages=prompt, max_tokens=8, seed=3, temperature=1.0)
                  .choices[0].message.content for _ in range(2)]
        assert seeded[0] == seeded[1]
    import openai

    with running(build_app(chat_run, api_key="s3cret")) as url:  # --api-key: the client's api_key is checked
        good = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=12
                                            ).choices[0].message.content == want
        with pytest.raises(openai.AuthenticationError, match="API key"):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # open, for load balancers


BAD_CHAT = [
    (b"{", 400, "not valid JSON"),
    (b"[]", 400, "valid dictionary"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(), 400, "text content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(), 400, "limit"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}).encode(), 400, "unknown field"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}).encode(), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}).encode(), 404, "does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400, "context"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode(), 413, "limit"),
]


def test_malformed_chat_requests_get_4xx_and_the_server_lives_on(tiny_llama_dir):
    app = build_app(tiny_llama_dir, limits=Limits(max_tokens=64))
    with running(app) as url:
        for body, status, words in BAD_CHAT:
            r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                           timeout=30)
            assert r.status_code == status, (body[:80], r.status_code, r.text)
            assert words in r.json()["error"]["message"], (body[:80], r.text)
        assert httpx.post(f"{url}/v1/classify", json={"texts": ["a"]}).status_code == 404
        assert httpx.get(f"{url}/v1/nothing").status_code == 404
        ok = _chat(url, messages=[{"role": "user", "content": "the cat"}], max_tokens=4, temperature=0)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_cancels_its_generation(tiny_llama_dir):
    app = build_app(tiny_llama_dir)
    model = app.state.served.model.model
    real, steps = model.forward, []

    def slow(*a, **k):  # 20 ms a token: the disconnect lands mid-answer
        steps.append(1)
        time.sleep(0.02)
        return real(*a, **k)

    model.forward = slow
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 200, "stream": True,
                           "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"200 OK" in s.recv(4096)  # headers and the first event, then the client is gone
        after = _chat(url, messages=[{"role": "user", "content": "the dog"}], max_tokens=3, temperature=0)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 3
    assert len(steps) < 100  # the abandoned answer stopped well before its 200 tokens


def test_concurrent_chat_requests_share_batches_and_keep_their_answers(chat_run):
    """Greedy answers from a batch equal the ones generated alone; seeded samples repeat."""
    from tunesmith.generate import ChatModel

    local = ChatModel(chat_run)
    questions = [r["messages"][0]["content"] for r in make_chat_rows()]
    alone = ["".join(local.stream(q, max_new_tokens=16, temperature=0)) for q in questions]
    app = build_app(chat_run, limits=Limits(chat_window_ms=300))
    with running(app) as url, ThreadPoolExecutor(len(questions)) as pool:
        def ask(q):
            r = _chat(url, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        together = list(pool.map(ask, questions))
        seeded = list(pool.map(lambda _: _chat(url, messages=[{"role": "user", "content": questions[0]}], max_tokens=8,
                                                 temperature=1.5, top_k=0, seed=7).json()["choices"][0]["message"]["content"],
                               range(3)))
        health = httpx.get(f"{url}/health").json()["batching"]
    assert together == alone
    assert len(set(seeded)) == 1
    assert health["items"] == len(questions) + 3 and health["batches"] < health["items"]


def test_a_request_that_arrives_mid_generation_joins_the_running_batch(chat_run):
    from tunesmith.generate import ChatModel

    local = ChatModel(chat_run)
    questions = [r["messages"][0]["content"] for r in make_chat_rows()[:3]]
    alone = ["".join(local.stream(q, max_new_tokens=16, temperature=0)) for q in questions]
    app = build_app(chat_run, limits=Limits(chat_window_ms=0))
    model = app.state.served.model.model
    real = model.forward

    def slow(*a, **k):  # 50 ms a step: the later requests come while the first is generating
        time.sleep(0.05)
        return real(*a, **k)

    model.forward = slow
    with running(app) as url, ThreadPoolExecutor(3) as pool:
        def ask(i):
            time.sleep(0.15 * i)
            r = _chat(url, messages=[{"role": "user", "content": questions[i]}], max_tokens=16, temperature=0)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        got = list(pool.map(ask, range(3)))
        health = httpx.get(f"{url}/health").json()["batching"]
    assert got == alone
    assert health["items"] == 3 and health["batches"] == 1  # one batch: the others joined it mid-flight
    assert 1 < health["mean_batch"] <= 3


@pytest.fixture(scope="module")
def image_run(tiny_timm_dir, tmp_path_factory) -> Path:
    from test_images import config, make_images

    root = tmp_path_factory.mktemp("serve-image")
    make_images(root / "train", 8, 0)
    make_images(root / "test", 3, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_CACHE", str(root / "cache"))
        tunesmith.train(config(tiny_timm_dir, root, root, optim={"epochs": 2}), quiet=True)
    return root / "run"


def test_image_classify_takes_uploads_like_predict(image_run):
    from tunesmith.predict import load

    files = sorted((image_run.parent / "test").rglob("*.png"))[:5]
    want = load(image_run).predict(files)
    app = build_app(image_run)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/classify", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files])
        assert r.status_code == 200, r.text
        assert [x["label"] for x in r.json()["results"]] == [w.label for w in want]
        for g, w in zip(r.json()["results"], want):
            assert all(abs(g["probabilities"][k] - v) < 1e-5 for k, v in w.probabilities.items())
        bad = httpx.post(f"{url}/v1/classify", files=[("image", ("notes.png", b"not an image", "image/png"))])
        assert bad.status_code == 400 and "notes.png" in bad.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/classify", json={"texts": ["a"]}).status_code == 415
        assert httpx.post(f"{url}/v1/classify", files={"other": ("a.txt", b"", "text/plain")}).status_code == 400
        assert httpx.get(f"{url}/health").json()["kind"] == "image"


def test_fuzzed_classify_bodies_never_take_the_server_down(text_run):
    """Random JSON (hypothesis) at /v1/classify: every answer a 200 or a 4xx with an error body."""
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                            max_size=4), max_leaves=12)
    bodies = st.dictionaries(st.sampled_from(["texts", "model", "extra", "text"]), values, max_size=3) | values
    client = TestClient(build_app(text_run, limits=Limits(max_inputs=8)), raise_server_exceptions=False)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        r = client.post("/v1/classify", json=body)
        assert r.status_code == 200 or (400 <= r.status_code < 500 and r.json()["error"]["message"]), (body, r.text)

    check()
    assert client.get("/health").json()["status"] == "ok"


def test_serve_refuses_a_busy_port_and_onnx_for_chat_with_one_line(text_run, tiny_llama_dir, run_cli):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_cli("serve", text_run, "--port", port)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    r = run_cli("serve", tiny_llama_dir, "--onnx")
    assert r.returncode == 2 and "--onnx serves classifiers" in r.stderr
    r = run_cli("serve", text_run, "--onnx")
    assert r.returncode == 2 and "no ONNX export" in r.stderr


def test_a_model_error_is_a_500_for_its_requests_and_the_server_goes_on(tiny_llama_dir):
    app = build_app(tiny_llama_dir)
    model = app.state.served.model.model
    real, calls = model.forward, []

    def broken_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return real(*a, **k)

    model.forward = broken_once
    with running(app) as url:
        bad = _chat(url, messages=[{"role": "user", "content": "the cat"}], max_tokens=4)
        assert bad.status_code == 500 and "simulated kernel failure" in bad.json()["error"]["message"]
        streamed = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
