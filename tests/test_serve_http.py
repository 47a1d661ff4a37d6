"""`lorakit serve` over HTTP: a live server on a free loopback port, driven with the official openai client
(answers checked against model.generate with only the requested adapter active) and with raw httpx for the
errors, adapter load/unload, disconnects, API key, a full queue and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import httpx
import openai
import pytest
from serve_fixtures import LiveServer, reference_greedy, save_adapters, save_tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base, tok = save_tiny_model(root / "tiny")
    folders = save_adapters(base, root / "adapters")
    return root, base, tok, folders


@pytest.fixture(scope="module")
def server(files):
    root, _, _, folders = files
    live = LiveServer(["--model", str(root / "tiny"), "--adapter", f"a8={folders['a8']}",
                       "--adapter", f"c16={folders['c16']}", "--max-batch", "8"], root / "server.log")
    yield live
    assert live.stop() == 0


def expected_text(files, adapter, prompt, n):
    _, base, tok, folders = files
    ids = tok(prompt)["input_ids"]
    tokens = reference_greedy(base, folders[adapter] if adapter else None, ids, n, tok.eos_token_id)
    return tok.decode(tokens, skip_special_tokens=True), tokens


def test_models_lists_base_and_adapters(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny", "a8", "c16"]
    assert [getattr(m, "parent") for m in models] == [None, "tiny", "tiny"]


PROMPTS = ["the plot is", "a great movie", "it was dull and", "the actors", "some scenes"]


def test_concurrent_greedy_requests_match_generate(files, server):
    client = server.client()
    jobs = [(name, prompt, 4 + i % 5) for i, (name, prompt) in
            enumerate((n, p) for p in PROMPTS for n in ("tiny", "a8", "c16"))]

    def ask(job):
        name, prompt, n = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, n), answer in zip(jobs, answers):
        text, tokens = expected_text(files, None if name == "tiny" else name, prompt, n)
        assert answer.choices[0].text == text, (name, prompt)
        assert answer.usage.completion_tokens == len(tokens)
        assert answer.choices[0].finish_reason == ("stop" if len(tokens) < n else "length")
    assert len({a.choices[0].text for a in answers}) > 3  # the adapters really differ


def test_stream_equals_whole_answer(files, server):
    client = server.client()
    whole = client.completions.create(model="a8", prompt="a great movie", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="a8", prompt="a great movie", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                          "stream": True}, timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_chat_uses_the_template(files, server):
    _, base, tok, folders = files
    messages = [{"role": "user", "content": "tell me about the movie"}]
    answer = server.client().chat.completions.create(model="c16", messages=messages, max_tokens=6, temperature=0)
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    tokens = reference_greedy(base, folders["c16"], ids, 6, tok.eos_token_id)
    assert answer.choices[0].message.content == tok.decode(tokens, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(ids)
    stream = server.client().chat.completions.create(model="c16", messages=messages, max_tokens=6, temperature=0,
                                                     stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.choices[0].message.content


def test_logprobs_and_seeded_sampling(server):
    client = server.client()
    answer = client.completions.create(model="a8", prompt="the plot is", max_tokens=4, temperature=0, logprobs=2)
    lp = answer.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) >= 1
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the top one
    one, two = (client.completions.create(model="c16", prompt="the plot is", max_tokens=8, temperature=1.0,
                                          top_p=0.9, seed=7) for _ in range(2))
    assert one.choices[0].text == two.choices[0].text


def error(response):
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "3"}, 400, "'max_tokens' must be int"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ({"model": "tiny", "prompt": "x" * 400, "max_tokens": 1}, 400, "context"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "lower max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "'n'"),
    ({"model": "tiny", "prompt": "x", "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ({"model": "tiny", "prompt": "x", "colour": 1}, 400, "unknown field 'colour'"),
    ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "several prompts"),
    ({"model": "tiny", "prompt": [1, 10**9]}, 400, "outside the vocabulary"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    assert needle in error(response)["message"]


def test_chat_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, timeout=30)
    assert r.status_code == 400 and "messages" in error(r)["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                              "logprobs": True}, timeout=30)
    assert r.status_code == 400


def test_load_and_unload_adapters(files, server, tmp_path):
    root, _, _, folders = files
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=60)  # noqa: E731
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(corrupt)})
    assert r.status_code == 400 and "bad" in error(r)["message"]
    other = _other_base_adapter(tmp_path)
    r = post("/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)})
    assert r.status_code == 400 and "does not fit this model" in error(r)["message"]
    assert [m.id for m in server.client().models.list().data] == ["tiny", "a8", "c16"]  # nothing half-loaded
    before = server.client().completions.create(model="a8", prompt="the actors", max_tokens=5, temperature=0)
    assert before.choices[0].text == expected_text(files, "a8", "the actors", 5)[0]

    r = post("/v1/load_lora_adapter", {"lora_name": "b4", "lora_path": str(folders["b4"])})
    assert r.status_code == 200, r.text
    answer = server.client().completions.create(model="b4", prompt="the actors", max_tokens=5, temperature=0)
    assert answer.choices[0].text == expected_text(files, "b4", "the actors", 5)[0]
    assert post("/v1/load_lora_adapter", {"lora_name": "b4", "lora_path": str(folders["b4"])}).status_code == 400

    # unloading an adapter that a running request uses is refused with 409; the request finishes unharmed
    stream = httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "b4", "prompt": "the actors", "max_tokens": 40, "temperature": 0,
                                "stream": True, "stop": ["never-appears-here"]})
    with stream as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        r = post("/v1/unload_lora_adapter", {"lora_name": "b4"})
        assert r.status_code == 409 and error(r)["code"] == "adapter_in_use"
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert post("/v1/unload_lora_adapter", {"lora_name": "b4"}).status_code == 200
    r = post("/v1/unload_lora_adapter", {"lora_name": "b4"})
    assert r.status_code == 404
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="b4", prompt="x", max_tokens=2)


def _other_base_adapter(tmp_path):
    """An adapter trained for a wider Llama: its shapes do not fit the served one."""
    import lorakit as lk
    from test_data import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    other = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok)))
    lk.inject(other, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return lk.save(other, tmp_path / "other")


def metric(server, name):
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30).text
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def test_disconnect_mid_stream_frees_the_row(server, files):
    # Greedy, and a continuation with no end-of-sequence token in it: the request is certainly still
    # generating when the client leaves (a sampled one could stop early and finish instead of being cancelled).
    _, tokens = expected_text(files, "c16", "the plot is", 80)
    assert len(tokens) == 80 and files[2].eos_token_id not in tokens, "pick a prompt that generates 80 tokens"
    cancelled = metric(server, "lorakit_cancelled_requests_total")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "c16", "prompt": "the plot is", "max_tokens": 80, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(server, "lorakit_cancelled_requests_total") > cancelled and \
                metric(server, "lorakit_running_batch_size") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the disconnected request kept its row")


def test_metrics_and_health(server):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("lorakit_requests_total", "lorakit_prompt_tokens_total", "lorakit_completion_tokens_total",
                 "lorakit_queue_depth", "lorakit_running_batch_size", "lorakit_request_latency_seconds_bucket",
                 "lorakit_time_to_first_token_seconds_bucket", "lorakit_adapters_loaded"):
        assert name in text
    assert metric(server, 'lorakit_completion_tokens_total{model="a8"}'.replace("{", r"\{").replace("}", r"\}")) > 0


@pytest.fixture(scope="module")
def strict(files):
    """One row, a queue of one, an API key."""
    root, _, _, folders = files
    live = LiveServer(["--model", str(root / "tiny"), "--adapter", f"a8={folders['a8']}", "--max-batch", "1",
                       "--max-queue", "1"], root / "strict.log", api_key="sesame")
    yield live
    live.stop()


def test_api_key_on_every_endpoint(strict):
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, strict.url + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401 and error(r)["code"] == "invalid_api_key", (method, path)
    assert strict.client().models.list().data[0].id == "tiny"


def test_full_queue_answers_503(strict):
    body = {"model": "a8", "prompt": "the plot is", "max_tokens": 60, "temperature": 1.0}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: httpx.post(strict.url + "/v1/completions", json=body, timeout=120,
                                                   headers=strict.headers).status_code, range(6)))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(strict):
    """Last test of the module: SIGTERM while a stream is running lets it finish, then the process exits 0."""
    first_chunk, lines = threading.Event(), []

    def ask():
        body = {"model": "tiny", "prompt": "the plot is", "max_tokens": 80, "temperature": 1.0, "stream": True,
                "stop": ["never-appears-here"]}
        with httpx.stream("POST", strict.url + "/v1/completions", json=body, headers=strict.headers,
                          timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()

    thread = threading.Thread(target=ask)
    thread.start()
    assert first_chunk.wait(30)
    started = time.monotonic()
    code = strict.stop(timeout=60)
    thread.join(30)
    assert code == 0, strict.log.read_text()[-2000:]
    assert time.monotonic() - started < 60
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
