"""elastiq serve: the real server (uvicorn on a free loopback port) talked to with the official
openai client and raw HTTP; its answers equal the engine's own, its errors are OpenAI's shape, and
its bounds (body, max_tokens, context, queue) and its concurrency (a load, a disconnect) hold."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from elastiq.runtime.chat import reply, stop_ids, template_ids
from elastiq.runtime.engine import Engine
from elastiq.runtime.floor import DEFAULT_MAX_KL
from elastiq.runtime.generate import Sampling
from elastiq.runtime.governor import Governor, memory_pressure, model_needs
from elastiq.machine import FreeMemory
from elastiq.runtime.serve import Limits, Server, visible
from conftest import context_dependent

CTX = 128
MESSAGES = [{"role": "user", "content": "Robert Boulter is an English film actor ."}]
PROMPT = "He had a guest role in 2000 ."


@pytest.fixture(scope="module")
def ckpt_path(tokenizer, data_dir, tmp_path_factory):
    """A tiny 4-bit (RTN) Llama offering rates 0, 0.15 and 0.35, whose greedy output depends on the
    context (test_backends' weights); its recorded quality puts rate 0.35 below the floor."""
    from elastiq.checkpoint import Checkpoint, record_quality
    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("serve")
    context_dependent("llama", tokenizer, root / "src")
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=32, quality_windows=0)
    float_path = compress(root / "src", root / "f.elastiq", options, data=data_dir, progress=False)
    path = quantize_checkpoint(float_path, root / "tiny.elastiq", QuantizeOptions(method="rtn", quality_windows=0),
                               data=data_dir, progress=False)
    measured = {0.0: 0.02, 0.15: 0.2, 0.35: 1.5}
    record_quality(Checkpoint(path), {r: {"heldout_ppl": 10.0 + kl, "kl_mean": kl, "kl_p99": 3 * kl,
                                          "top1_agreement": 0.9, "tokens": 100} for r, kl in measured.items()})
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server of ``server`` in a thread, stopped as uvicorn's SIGINT handler would."""

    def __init__(self, server: Server):
        import uvicorn

        self.server, self.port = server, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def engine(ckpt_path):
    return Engine(ckpt_path, 0.0, ctx=CTX)


@pytest.fixture(scope="module")
def reference(ckpt_path):
    """A second engine on the same checkpoint: what a direct run answers."""
    return Engine(ckpt_path, 0.0, ctx=CTX)


@pytest.fixture(scope="module")
def running(engine):
    run = Running(Server(engine, Limits(max_body=64 * 1024, max_queue=8, max_tokens=12)))
    yield run
    run.stop()


def _expected_chat(reference: Engine, rate: float, max_tokens: int) -> str:
    reference.set_rate(rate)
    reference.generator.reset()
    return reply(reference, MESSAGES, max_tokens, Sampling(), lambda _: None)[0]


def _expected_completion(reference: Engine, max_tokens: int) -> str:
    reference.set_rate(0.0)
    reference.generator.reset()
    tokens = reference.generator.generate(reference.tokenizer.encode(PROMPT), max_tokens, Sampling(),
                                          stop_ids(reference.tokenizer)).tokens
    return reference.tokenizer.decode(tokens, skip_special_tokens=True)


def test_the_openai_client_gets_what_the_engine_answers(running, reference):
    client = running.client()
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny@0.0", "tiny@0.15"]  # 0.35 is below the floor
    want = _expected_chat(reference, 0.0, 20)
    assert len(want) > 10
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    prompt_tokens = len(template_ids(reference.tokenizer, MESSAGES, add_generation_prompt=True))
    assert got.usage.prompt_tokens == prompt_tokens and got.usage.completion_tokens <= 20
    assert got.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    want = _expected_completion(reference, 16)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16)
    assert got.choices[0].text == want and got.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    # a stop string ends the text before it, streamed or not
    cut = want[len(want) // 2:len(want) // 2 + 2]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, stop=[cut])
    assert got.choices[0].text == want[:want.index(cut)] and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, stop=cut, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want[:want.index(cut)]
    # sampling: a seed repeats itself
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_a_request_pins_a_rate_and_the_next_one_returns(running, reference):
    client = running.client()
    want = _expected_chat(reference, 0.15, 16)
    got = client.chat.completions.create(model="tiny@0.15", messages=MESSAGES, max_tokens=16)
    assert got.choices[0].message.content == want and got.model_extra["elastiq"] == {"rate": 0.15}
    assert httpx.get(running.url + "/v1/elastiq/status").json()["rate"] == 0.15
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16,
                                         extra_body={"elastiq": {"rate": 0.15}})
    assert got.choices[0].message.content == want
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
    assert got.model_extra["elastiq"] == {"rate": 0.0} and got.choices[0].message.content == \
        _expected_chat(reference, 0.0, 16)
    status = httpx.get(running.url + "/v1/elastiq/status").json()
    assert status["rate"] == 0.0 and status["switches"] >= 2 and status["requests_served"] >= 3
    assert status["free_memory_bytes"] > 0 and status["tokens_per_second"] > 0


ERRORS = [  # (body, status, code, param, words of the message)
    (b"{not json", 400, "invalid_json", None, "not valid JSON"),
    (b"[1, 2]", 400, "invalid_json", None, "must be a JSON object"),
    ({"model": "tiny"}, 400, "missing_field", "messages", "'messages' is required"),
    ({"messages": "hello"}, 400, "invalid_type", "messages", "must be an array"),
    ({"messages": [{"role": "user"}]}, 400, "invalid_type", "messages[0]", "string 'content'"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, 400, "invalid_type", "max_tokens", "must be an integer"),
    ({"messages": MESSAGES, "max_tokens": True}, 400, "invalid_type", "max_tokens", "must be an integer"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "invalid_type", "temperature", "must be a number"),
    ({"messages": MESSAGES, "stream": 1}, 400, "invalid_type", "stream", "must be a boolean"),
    ({"messages": MESSAGES, "stop": [1]}, 400, "invalid_type", "stop", "up to 4 non-empty strings"),
    ({"messages": MESSAGES, "model": "gpt-4"}, 404, "model_not_found", "model", "'gpt-4' does not exist"),
    ({"messages": MESSAGES, "max_tokens": CTX + 1}, 400, "invalid_value", "max_tokens", "1 to the context, 128"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "context_length_exceeded", "messages",
     "the context holds 128"),
    ({"messages": MESSAGES, "n": 2}, 400, "invalid_value", "n", "only n=1"),
    (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, "invalid_type", "temperature",
     "must be a number"),
    ({"messages": MESSAGES, "temperature": 2.5}, 400, "invalid_value", "temperature", "0 to 2"),
    ({"messages": MESSAGES, "seed": 2**64}, 400, "invalid_value", "seed", "64-bit integer"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "invalid_value", None, "top_p must be in (0, 1]"),
    ({"messages": MESSAGES, "model": "tiny@0.3"}, 400, "invalid_rate", "model", "rate 0.3 is not offered"),
    ({"messages": MESSAGES, "model": "tiny@x"}, 400, "invalid_rate", "model", "pins no rate"),
    ({"messages": MESSAGES, "elastiq": {"rate": 0.35}}, 400, "invalid_rate", "elastiq.rate",
     "below the quality floor"),
    ({"messages": MESSAGES, "elastiq": {"rate": "fast"}}, 400, "invalid_type", "rate", "must be a number"),
    ({"messages": MESSAGES, "x": "y" * 70_000}, 413, "body_too_large", None, "exceeds 65536 bytes"),
]


@pytest.mark.parametrize("body, status, code, param, words", ERRORS, ids=[str(e[2]) + str(i)
                                                                          for i, e in enumerate(ERRORS)])
def test_a_bad_request_gets_an_openai_error(running, body, status, code, param, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    answer = httpx.post(running.url + "/v1/chat/completions", headers={"content-type": "application/json"},
                        timeout=30, **kwargs)
    error = answer.json()["error"]
    assert answer.status_code == status and error["code"] == code and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and words in error["message"], error


def test_other_bad_requests(running):
    answer = httpx.post(running.url + "/v1/completions", json={"prompt": {"a": 1}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    answer = httpx.post(running.url + "/v1/completions", json={"prompt": [10**9]})
    assert answer.status_code == 400 and "array of token ids" in answer.json()["error"]["message"]
    answer = httpx.get(running.url + "/v1/nothing")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    answer = httpx.get(running.url + "/v1/chat/completions")
    assert answer.status_code == 405 and answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        running.client().chat.completions.create(model="other", messages=MESSAGES)


def test_an_api_key_is_required_when_set(engine):
    run = Running(Server(engine, api_key="s3cret"))
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
                answer = httpx.request(method, run.url + path, headers=headers, json={"messages": MESSAGES})
                assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            run.client("wrong").models.list()
        got = run.client("s3cret").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert got.usage.completion_tokens >= 1
    finally:
        run.stop()


def test_eight_clients_fifty_requests_without_a_failure(running):
    client = running.client()
    before = httpx.get(running.url + "/v1/elastiq/status").json()["requests_served"]

    def one(i: int) -> int:
        if i % 3 == 0:
            chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, stream=True)
            return len("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        if i % 3 == 1:
            return client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=8).usage.total_tokens
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": str(i)}],
                                              max_tokens=8).usage.total_tokens

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(50)))
    assert len(results) == 50 and time.monotonic() - start < 60
    assert httpx.get(running.url + "/v1/elastiq/status").json()["requests_served"] == before + 50


def _slow(engine: Engine, monkeypatch, seconds: float) -> None:
    """Each decode step of ``engine`` takes ``seconds`` more, and no token stops a reply (a test double)."""
    run = engine.generator._run
    monkeypatch.setattr(engine.generator, "_run", lambda tokens, start: (time.sleep(seconds), run(tokens, start))[1])


def test_a_disconnected_stream_frees_the_engine(running, engine, monkeypatch):
    monkeypatch.setattr(running.server, "stops", [])
    _slow(engine, monkeypatch, 0.05)
    before = httpx.get(running.url + "/v1/elastiq/status").json()
    with httpx.stream("POST", running.url + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 100, "stream": True}) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generating (100 tokens would take 5 s)
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up on a reply that is not streamed
        httpx.post(running.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 100}, timeout=0.5)
    start = time.monotonic()
    got = running.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert got.usage.completion_tokens == 2 and time.monotonic() - start < 3
    after = httpx.get(running.url + "/v1/elastiq/status").json()
    assert after["requests_served"] == before["requests_served"] + 3
    assert after["tokens_generated"] - before["tokens_generated"] < 2 + 2 * 40  # the first two stopped early


def test_a_full_queue_answers_503_with_retry_after(engine, monkeypatch):
    run = Running(Server(engine, Limits(max_queue=1)))
    gate = threading.Event()
    try:
        run.server.worker.submit(gate.wait)  # the engine is busy
        with ThreadPoolExecutor(2) as pool:
            body = {"prompt": PROMPT, "max_tokens": 2}
            first = pool.submit(httpx.post, run.url + "/v1/completions", json=body, timeout=30)
            second = pool.submit(httpx.post, run.url + "/v1/completions", json=body, timeout=30)
            while run.server.admitted < 2:
                time.sleep(0.01)
            refused = httpx.post(run.url + "/v1/completions", json=body, timeout=30)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full" and "1 requests are waiting" in \
                refused.json()["error"]["message"]
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        gate.set()
        run.stop()


def test_visible_text_holds_back_what_may_start_a_stop_string():
    assert visible("Hello wor", ["world"]) == (6, False)
    assert visible("Hello world!", ["world", "lo"]) == (3, True)
    assert visible("Hello", []) == (5, False)


class Device:
    """A test double of the free-memory probe: a device with ``room`` bytes for the model, of which
    the engine's current rate holds its predicted share."""

    def __init__(self, engine: Engine, needs: dict[float, int], room: int):
        self.engine, self.needs, self.room = engine, needs, room

    def __call__(self) -> FreeMemory:
        return FreeMemory(max(self.room - self.needs[self.engine.rate], 0), "a test device")


def _until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_governor_shrinks_under_pressure_and_grows_back(engine, reference, monkeypatch):
    needs = model_needs(engine, DEFAULT_MAX_KL)
    assert sorted(needs) == [0.0, 0.15] and needs[0.15] < needs[0.0]  # 0.35 is below the floor
    plenty, tight = 10 * needs[0.0], (needs[0.0] + needs[0.15]) / 2 / 0.9  # tight: 0.15 fits, 0.0 does not
    device = Device(engine, needs, plenty)
    run = Running(Server(engine, Limits(max_tokens=40), governor=Governor(needs, 0.0, device, hold_s=0.5,
                                                                         interval_s=0.05)))
    status = lambda: httpx.get(run.url + "/v1/elastiq/status").json()  # noqa: E731
    try:
        client = run.client()
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4).model_extra[
            "elastiq"] == {"rate": 0.0}
        # a drop while a request streams: it goes on at the new rate, from the next token, to its end
        monkeypatch.setattr(run.server, "stops", [])
        _slow(engine, monkeypatch, 0.02)
        stream = iter(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, stream=True,
                                                stream_options={"include_usage": True}))
        next(stream)
        device.room = tight
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 40 and chunks[-2].model_extra["elastiq"] == {"rate": 0.15}
        monkeypatch.undo()
        # after the switch, the same answer as a fresh engine at that rate
        got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
        assert got.model_extra["elastiq"] == {"rate": 0.15}
        assert got.choices[0].message.content == _expected_chat(reference, 0.15, 16)
        with pytest.raises(openai.BadRequestError, match="less pruned than the rate 0.15 this server runs"):
            client.chat.completions.create(model="tiny@0.0", messages=MESSAGES)
        # no rate fits: new requests get 503 with the reason
        device.room = 0
        _until(lambda: status()["governor"]["starved"])
        answer = httpx.post(run.url + "/v1/completions", json={"prompt": PROMPT})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "memory_pressure"
        assert "no rate fits" in answer.json()["error"]["message"] and answer.headers["retry-after"] == "1"
        # memory comes back: after the hold-off, the rate grows back, and answers equal rate 0's
        device.room = plenty
        start = time.monotonic()
        _until(lambda: status()["rate"] == 0.0)
        assert time.monotonic() - start >= 0.4
        got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
        assert got.choices[0].message.content == _expected_chat(reference, 0.0, 16)
        assert status()["governor"]["moves"] == 2 and status()["switches"] == 2
    finally:
        run.stop()


def test_memory_pressure_is_read_from_linux_psi(tmp_path):
    (tmp_path / "memory").write_text("some avg10=12.50 avg60=1.00 avg300=0.00 total=5\n"
                                     "full avg10=3.00 avg60=0.00 avg300=0.00 total=1\n")
    assert memory_pressure(tmp_path / "memory") == 0.125 and memory_pressure(tmp_path / "none") is None


def test_the_serve_command_answers_and_stops_on_sigterm(ckpt_path, tmp_path):
    path = shutil.copytree(ckpt_path, tmp_path / "cmd.elastiq")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "elastiq", "serve", str(path), "--port", str(port), "--ctx",
                             str(CTX), "--max-new-tokens", "4"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert models["data"][0]["id"] == "cmd"
        got = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": MESSAGES}).json()
        assert 1 <= got["usage"]["completion_tokens"] <= 4  # --max-new-tokens is the default max_tokens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        log = proc.stderr.read()
        assert "serving cmd at rate 0.0 on http://127.0.0.1" in log and "Traceback" not in log
        assert "elastiq: stopped after serving 1 requests" in log and "Finished server process" in log, log
    finally:
        proc.kill()


def test_an_engine_failure_is_a_500_in_openai_shape(running, engine, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(engine.generator, "generate", fail)
    answer = httpx.post(running.url + "/v1/completions", json={"prompt": PROMPT}, timeout=30)
    assert answer.status_code == 500 and answer.json()["error"] == {
        "message": "internal error: RuntimeError: the engine broke", "type": "server_error", "param": None,
        "code": "internal_error"}
    with httpx.stream("POST", running.url + "/v1/completions", json={"prompt": PROMPT, "stream": True}) as answer:
        events = [line for line in answer.iter_lines() if line.startswith("data:")]
    assert answer.status_code == 200 and "the engine broke" in events[-1] and "[DONE]" not in events[-1]
    monkeypatch.undo()
    assert running.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
