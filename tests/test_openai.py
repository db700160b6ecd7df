"""The OpenAI-compatible server of a causal LM, driven by the official `openai` client over loopback HTTP: a real
uvicorn, a tiny random LLaMA with a ChatML tokenizer, and three adapters with different random weights."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from test_serve import LiveServer, _serve_process
from tiny_lm import tiny_causal_lm, tiny_tokenizer

import adakron
from adakron.serving import create_app, main
from adakron.serving.app import generates_text
from adakron.training.generate import Sampling, generate_ids
from adakron.training.lm import prompt_ids

BASE = "tiny-llama"  # the served name of the base model
ADAPTERS = ("a", "b", "c")
NAMES = (BASE, *ADAPTERS)
MAX_TOKENS = 40  # the server's --max-tokens
CONTEXT = 128  # tiny_causal_lm's max_position_embeddings
MAX_PROMPTS = 4
BODY_LIMIT = 256 * 1024
PROMPTS = ["the cat sat", "what is the capital of france", "1 2 3"]
CHAT = [{"role": "system", "content": "you are a poem"}, {"role": "user", "content": "write about the sea"}]
N = 12  # tokens per answer in most tests


# One torch thread for these tiny models, set for the module and restored after it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Adapter directories, and the library's reference: the adapters loaded from them onto another copy."""
    base = tmp_path_factory.mktemp("openai")
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = adakron.AdaKronConfig(rank=8, head_modules=(), init="reference", initializer_range=1.0)
        adakron.add_adapter(model, config, name=name)
        adakron.save_adapter(model, base / name, name=name)
    reference = tiny_causal_lm(tokenizer)
    for name in ADAPTERS:
        adakron.load_adapter(reference, base / name, name=name)
    return {"base": base, "dirs": {name: base / name for name in ADAPTERS}, "tokenizer": tokenizer,
            "reference": reference}


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def expect(work):
    """expect(name, prompt, chat=False, n=N) -> (text, finish_reason, completion_tokens): the library's greedy
    answer for that adapter alone (``generate_ids``, one prompt, no batch)."""
    tokenizer, model = work["tokenizer"], work["reference"]

    def answer(name: str, prompt, chat: bool = False, n: int = N) -> tuple[str, str, int]:
        adapter = None if name == BASE else name
        ids = generate_ids(model, tokenizer, [prompt], [adapter], template="auto" if chat else "raw",
                           sampling=Sampling(max_new_tokens=n))[0]
        stopped = len(ids) < n  # ended by the end-of-sequence token, which counts as generated
        return _decode(tokenizer, ids), "stop" if stopped else "length", len(ids) + stopped

    return answer


def _app(work, **settings):
    options = {"model_name": BASE, "max_tokens": MAX_TOKENS, "max_rows": MAX_PROMPTS, "max_wait_ms": 0,
               "max_body_bytes": BODY_LIMIT}
    return create_app(tiny_causal_lm(work["tokenizer"]), tiny_tokenizer(), dict(work["dirs"]),
                      **{**options, **settings})


@pytest.fixture(scope="module")
def server(work):
    with LiveServer(_app(work)) as live:
        yield live


@pytest.fixture(scope="module")
def batching(work):
    """A server whose batches wait 400 ms for company, so that concurrent requests surely share one."""
    with LiveServer(_app(work, max_wait_ms=400)) as live:
        yield live


def _client(live, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", **{"max_retries": 0, "timeout": 60, **options})


@pytest.fixture()
def client(server):
    with _client(server) as c:
        yield c


def _stats(live) -> dict:
    return httpx.get(f"{live.url}/healthz").json()["stats"]


def _fingerprint(work, name: str) -> str | None:
    return None if name == BASE else adakron.read_adapter(work["dirs"][name])[1]["weights_sha256"]


def _alive(client) -> None:
    answer = client.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------------------------------- answers

def test_models_lists_the_base_model_and_every_adapter(server, client, work):
    models = client.models.list().data
    assert [m.id for m in models] == list(NAMES)
    assert all(m.object == "model" and m.owned_by == "adakron" and m.created > 0 for m in models)
    assert [m.parent for m in models] == [None, BASE, BASE, BASE]
    assert models[1].root == str(work["dirs"]["a"]) and models[0].max_model_len == CONTEXT
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/healthz"} <= set(schema["paths"])
    assert {"CompletionRequest", "ChatRequest", "ChatCompletion"} <= set(schema["components"]["schemas"])


def test_greedy_answers_of_each_adapter_equal_the_library_alone(client, expect, work):
    tokenizer, texts = work["tokenizer"], set()
    for name in NAMES:
        for prompt in PROMPTS[:2]:
            text, finish, tokens = expect(name, prompt)
            answer = client.completions.create(model=name, prompt=prompt, max_tokens=N, temperature=0)
            (choice,) = answer.choices
            assert (choice.text, choice.finish_reason, choice.index) == (text, finish, 0), name
            assert answer.object == "text_completion" and answer.model == name
            assert answer.system_fingerprint == _fingerprint(work, name)
            prompt_tokens = len(prompt_ids(tokenizer, prompt, "raw"))
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
                prompt_tokens, tokens, prompt_tokens + tokens)
            texts.add(text)
        text, finish, tokens = expect(name, CHAT, chat=True)
        answer = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0)
        (choice,) = answer.choices
        assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
        assert answer.usage.prompt_tokens == len(prompt_ids(tokenizer, CHAT)) and answer.usage.completion_tokens \
            == tokens
        texts.add(text)
    assert len(texts) == 3 * len(NAMES)  # not vacuous: every adapter writes something else
    # max_completion_tokens is the newer name of max_tokens; several prompts give one choice each, in order.
    answer = client.chat.completions.create(model="b", messages=CHAT, max_completion_tokens=3, temperature=0)
    assert answer.choices[0].message.content == expect("b", CHAT, chat=True, n=3)[0]
    # A message as a client echoes one back (null fields, text parts) reads as the plain one.
    echoed = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}], "refusal": None,
                        "tool_calls": None}]
    answer = client.chat.completions.create(model="b", messages=echoed, max_completion_tokens=3, temperature=0)
    assert answer.choices[0].message.content == expect("b", CHAT, chat=True, n=3)[0]
    answer = client.completions.create(model="c", prompt=PROMPTS, max_tokens=5, temperature=0)
    assert [c.text for c in answer.choices] == [expect("c", p, n=5)[0] for p in PROMPTS]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    ids = prompt_ids(tokenizer, PROMPTS[0], "raw")  # token ids are a prompt too
    answer = client.completions.create(model="a", prompt=ids, max_tokens=5, temperature=0)
    assert answer.choices[0].text == expect("a", PROMPTS[0], n=5)[0]


def _streamed(stream) -> tuple[dict[int, str], dict[int, str], object, list]:
    texts, finishes, usage, chunks = {}, {}, None, []
    for chunk in stream:
        chunks.append(chunk)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage, chunks


def test_streaming_gives_the_same_text_as_not_streaming(client):
    for name in ("a", BASE):
        whole = client.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=N, temperature=0)
        texts, finishes, usage, chunks = _streamed(client.completions.create(
            model=name, prompt=PROMPTS[:2], max_tokens=N, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert texts == {c.index: c.text for c in whole.choices}
        assert finishes == {c.index: c.finish_reason for c in whole.choices}
        assert usage.model_dump() == whole.usage.model_dump() and len(chunks) > 3
        assert all(chunk.object == "text_completion" and chunk.id == chunks[0].id for chunk in chunks)

        whole = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, temperature=0)
        texts, finishes, usage, chunks = _streamed(client.chat.completions.create(
            model=name, messages=CHAT, max_tokens=N, temperature=0, stream=True))
        assert texts == {0: whole.choices[0].message.content}
        assert finishes == {0: whole.choices[0].finish_reason} and usage is None
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"


def test_stop_strings_end_the_text_before_them_streaming_or_not(client, expect):
    text = expect("b", PROMPTS[1], n=MAX_TOKENS)[0]
    # A stop string first found past the first few characters, so the text before it is not empty.
    start = next(i for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()
                 and text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    for stops in (stop, ["never-said", stop]):
        answer = client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                           stop=stops)
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == (text[:start], "stop")
        assert answer.usage.completion_tokens < MAX_TOKENS
        texts, finishes, _, _ = _streamed(client.completions.create(
            model="b", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=stops, stream=True))
        assert (texts, finishes) == ({0: text[:start]}, {0: "stop"})


def test_the_end_of_sequence_token_ends_a_row_with_finish_reason_stop(server, client, work):
    tokenizer, model = work["tokenizer"], server.app.state.engine.model
    ids = generate_ids(work["reference"], tokenizer, [PROMPTS[2]], ["c"], template="raw",
                       sampling=Sampling(max_new_tokens=N))[0]
    end = ids[4]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = end
    try:
        answer = client.completions.create(model="c", prompt=PROMPTS[2], max_tokens=N, temperature=0)
    finally:
        model.generation_config.eos_token_id = saved
    cut = ids.index(end)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (_decode(tokenizer, ids[:cut]), "stop")
    assert answer.usage.completion_tokens == cut + 1


def test_sampling_follows_seed_temperature_and_top_p(client):
    def text(**settings) -> str:
        answer = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=N, **settings)
        return answer.choices[0].text

    seeded = text(temperature=1.0, seed=5)
    assert text(temperature=1.0, seed=5) == seeded
    assert text(seed=5) == seeded  # the default temperature is 1 (the tiny model's config sets none)
    greedy = text(temperature=0)
    assert len({text(temperature=1.0, seed=s) for s in range(4)} | {greedy}) > 2
    assert text(temperature=1.0, top_p=1e-6, seed=1) == greedy  # only the most likely token is left
    assert text(temperature=1e-7, seed=1) == greedy  # below 1e-5: greedy, as vLLM does


def test_the_checkpoint_generation_config_sets_the_sampling_defaults(work):
    model = tiny_causal_lm(work["tokenizer"])
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    limits = create_app(model, tiny_tokenizer(), model_name=BASE).state.limits
    assert (limits.temperature, limits.top_p, limits.context) == (0.6, 0.9, CONTEXT)
    assert generates_text(model) and not generates_text(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- batching

def _concurrently(live, calls) -> list:
    """Run each ``call(client)`` on its own thread, all released at once; their results (or errors)."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        with _client(live) as c:
            c.models.list()  # connect first
            start.wait()
            try:
                results[i] = calls[i](c)
            except openai.APIError as e:
                results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def _greedy(name: str, prompt: str, n: int = N):
    return lambda c: c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0]


def test_concurrent_requests_for_different_adapters_share_batches_and_keep_their_answers(batching, expect):
    jobs = [(name, prompt, N) for name in NAMES for prompt in PROMPTS[:2]] + [("a", PROMPTS[2], 5)]
    chat = lambda c: c.chat.completions.create(model="b", messages=CHAT, max_tokens=N, temperature=0)
    sample = lambda c: c.completions.create(model="c", prompt=PROMPTS[2], max_tokens=N, seed=11)
    before = _stats(batching)
    results = _concurrently(batching, [_greedy(*job) for job in jobs] + [chat, sample])
    stats = _stats(batching)
    for (name, prompt, n), choice in zip(jobs, results):  # rows of other lengths end at their own max_tokens
        assert (choice.text, choice.finish_reason) == expect(name, prompt, n=n)[:2], (name, prompt)
    assert results[-2].choices[0].message.content == expect("b", CHAT, chat=True)[0]
    with _client(batching) as c:  # a seed gives the same text alone as in a batch with others
        assert sample(c).choices[0].text == results[-1].choices[0].text
    assert stats["requests"] - before["requests"] == len(results)
    assert stats["batches"] - before["batches"] < len(results) / 2, stats
    assert stats["mixed_batches"] > before["mixed_batches"] and stats["max_adapters_per_batch"] == len(NAMES)


def test_a_request_that_breaks_the_batch_fails_alone(batching, work, expect):
    tokenizer = work["tokenizer"]
    poison = tokenizer.convert_tokens_to_ids("<|im_start|>")  # in no completion prompt below
    embeddings = batching.app.state.engine.model.get_input_embeddings()

    def trap(module, inputs):
        if inputs[0].shape[1] > 1 and (inputs[0] == poison).any():  # the prefill of a batch holding it
            raise RuntimeError("poisoned prompt")

    hook = embeddings.register_forward_pre_hook(trap)
    try:
        bad = lambda c: c.completions.create(model="b", prompt=[poison, 5, 6], max_tokens=N)
        jobs = [("a", PROMPTS[0]), (BASE, PROMPTS[1]), ("c", PROMPTS[2])]
        before = _stats(batching)
        results = _concurrently(batching, [bad, *(_greedy(*job) for job in jobs)])
        stats = _stats(batching)
    finally:
        hook.remove()
    assert isinstance(results[0], openai.InternalServerError) and results[0].body["type"] == "server_error"
    for job, choice in zip(jobs, results[1:]):
        assert (choice.text, choice.finish_reason) == expect(*job)[:2]
    assert stats["failed_requests"] - before["failed_requests"] == 1
    assert stats["mixed_batches"] > before["mixed_batches"]  # they did meet in one batch first
    with _client(batching) as c:
        _alive(c)


def test_a_client_that_goes_away_stops_its_rows(server, client):
    embeddings = server.app.state.engine.model.get_input_embeddings()
    hook = embeddings.register_forward_pre_hook(lambda module, inputs: time.sleep(0.02))  # 40 tokens: ~1 s
    try:
        for streaming in (True, False):
            before = _stats(server)
            if streaming:
                stream = client.completions.create(model="a", prompt="hi", max_tokens=MAX_TOKENS, stream=True)
                next(iter(stream))
                stream.close()
            else:
                with pytest.raises(openai.APITimeoutError):
                    client.with_options(timeout=0.3).completions.create(model="a", prompt="hi",
                                                                         max_tokens=MAX_TOKENS)
            deadline = time.monotonic() + 10
            while _stats(server)["cancelled_rows"] == before["cancelled_rows"]:
                assert time.monotonic() < deadline, "the row was not stopped"
                time.sleep(0.05)
            assert _stats(server)["completion_tokens"] - before["completion_tokens"] < MAX_TOKENS
    finally:
        hook.remove()
    _alive(client)


# ------------------------------------------------------------------------------------------------- bad input

LONG = [5] * (CONTEXT - 10)  # token ids: a prompt that leaves 10 tokens of context
BAD = [
    ("unknown model", "completions", {"model": "nope"}, openai.NotFoundError, "model", "model_not_found"),
    ("max_tokens over the limit", "completions", {"max_tokens": MAX_TOKENS + 1}, openai.BadRequestError,
     "max_tokens", "invalid_value"),
    ("prompt + max_tokens over the context", "completions", {"prompt": LONG, "max_tokens": 11},
     openai.BadRequestError, "prompt", "context_length_exceeded"),
    ("prompt over the context", "completions", {"prompt": [5] * (CONTEXT + 1)}, openai.BadRequestError, "prompt",
     "context_length_exceeded"),
    ("messages + max_tokens over the context", "chat", {"messages": [{"role": "user", "content": "1 2 3 " * 40}],
                                                        "max_completion_tokens": 30}, openai.BadRequestError,
     "messages", "context_length_exceeded"),
    ("negative temperature", "completions", {"temperature": -0.5}, openai.BadRequestError, "temperature",
     "invalid_value"),
    ("temperature above 2", "chat", {"temperature": 2.5}, openai.BadRequestError, "temperature", "invalid_value"),
    ("top_p 0", "completions", {"top_p": 0}, openai.BadRequestError, "top_p", "invalid_value"),
    ("top_p above 1", "chat", {"top_p": 1.5}, openai.BadRequestError, "top_p", "invalid_value"),
    ("n > 1", "completions", {"n": 2}, openai.BadRequestError, "n", "invalid_value"),
    ("max_tokens as text", "completions", {"max_tokens": "ten"}, openai.BadRequestError, "max_tokens",
     "invalid_type"),
    ("max_tokens 0", "chat", {"max_tokens": 0}, openai.BadRequestError, "max_tokens", "invalid_value"),
    ("stream as text", "completions", {"stream": "yes"}, openai.BadRequestError, "stream", "invalid_type"),
    ("seed as text", "completions", {"seed": "7"}, openai.BadRequestError, "seed", "invalid_type"),
    ("five stop strings", "completions", {"stop": list("abcde")}, openai.BadRequestError, "stop", "invalid_value"),
    ("penalty", "chat", {"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty", "invalid_value"),
    ("empty prompt list", "completions", {"prompt": []}, openai.BadRequestError, "prompt", "invalid_value"),
    ("empty prompt", "completions", {"prompt": ""}, openai.BadRequestError, "prompt", "invalid_value"),
    ("too many prompts", "completions", {"prompt": ["hi"] * (MAX_PROMPTS + 1)}, openai.BadRequestError, "prompt",
     "invalid_value"),
    ("token id outside the vocabulary", "completions", {"prompt": [1, 10**6]}, openai.BadRequestError, "prompt",
     "invalid_value"),
    ("no messages", "chat", {"messages": []}, openai.BadRequestError, "messages", "invalid_value"),
    ("unknown role", "chat", {"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError,
     "messages", "invalid_value"),
    ("tool calls", "chat", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
     openai.BadRequestError, "messages", "invalid_value"),
    ("image content", "chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, openai.BadRequestError, "messages", "invalid_value"),
    ("unknown parameter", "completions", {"extra_body": {"top_k": 3}}, openai.BadRequestError, "top_k",
     "unknown_parameter"),
]


@pytest.mark.parametrize("route,arguments,error,param,code", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(client, route, arguments, error, param,
                                                                      code):
    create = client.completions.create if route == "completions" else client.chat.completions.create
    defaults = {"model": "a", "prompt": "hi"} if route == "completions" else {"model": "a", "messages": CHAT}
    with pytest.raises(error) as e:
        create(**{**defaults, **arguments})
    assert e.value.response.headers["content-type"].startswith("application/json")
    body = e.value.body  # the client unwraps {"error": {...}}
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, code), body
    _alive(client)


def test_malformed_missing_and_oversized_bodies_and_unknown_routes_get_openai_errors(client):
    cases = [
        ({"content": b'{"model": "a", "prompt": '}, openai.BadRequestError, None, "invalid_json"),
        ({"body": {"model": "a"}}, openai.BadRequestError, "prompt", "missing_required_parameter"),
        ({"body": ["a", "hi"]}, openai.BadRequestError, None, "invalid_type"),
        ({"content": b'{"model": "a", "prompt": "' + b"x" * BODY_LIMIT + b'"}'}, openai.APIStatusError, None,
         "body_too_large"),
    ]
    for request, error, param, code in cases:
        with pytest.raises(error) as e:
            client.post("/completions", cast_to=object, options={"headers": {"content-type": "application/json"}},
                        **request)
        assert (e.value.body["param"], e.value.body["code"]) == (param, code), e.value.body
        assert e.value.status_code == (413 if code == "body_too_large" else 400)
        _alive(client)
    for path in ("/nothing", "/predict"):  # a causal LM has no classifier routes
        with pytest.raises(openai.NotFoundError) as e:
            client.get(path, cast_to=object)
        assert "No such endpoint" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.get("/completions", cast_to=object)
    assert e.value.status_code == 405 and e.value.body["type"] == "invalid_request_error"
    _alive(client)


# --------------------------------------------------------------------------------------------------- the command

def test_the_command_serves_a_causal_lm_with_its_adapters(work, expect, capsys):
    folder = work["base"] / "model"
    tiny_causal_lm(work["tokenizer"]).save_pretrained(folder)
    work["tokenizer"].save_pretrained(folder)
    adapter = f"a={work['dirs']['a']}"
    capsys.readouterr()
    assert main(["--model", str(folder), "--adapter", adapter, "--adapter-root", str(work["base"]),
                 "--allow-admin"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not supported for causal LMs" in err and "\n" not in err, err
    process, url, _, _ = _serve_process({"model_dir": folder}, "--adapter", adapter, "--served-model-name", BASE,
                                        "--max-tokens", "16")
    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as c:
            assert [m.id for m in c.models.list().data] == [BASE, "a"]
            answer = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=N, temperature=0)
            assert answer.choices[0].text == expect("a", PROMPTS[0])[0]
            with pytest.raises(openai.BadRequestError):
                c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=17)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
