"""A real `channelmerge serve` process queried with the `openai` package."""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

from .conftest import EXPERTS, needs_vllm
from .engine_script import MAX_TOKENS, PROMPTS

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["api_key"], max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    """Raw HTTP with the server's API key (routes the `openai` client has no method for)."""
    import requests

    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {server['api_key']}"
    return s


def _complete(client, expert, prompt_idx):
    r = client.completions.create(model=expert, prompt=PROMPTS[prompt_idx], max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True})
    return r


def test_models_lists_every_expert_and_auto(client):
    assert [m.id for m in client.models.list().data] == EXPERTS + ["auto"]


@pytest.mark.parametrize("expert", EXPERTS)
def test_completion_answers_as_the_expert(client, plugin_run, expert):
    r = _complete(client, expert, 0)
    assert r.model == expert
    assert r.choices[0].text == plugin_run["single"][expert][0]["text"]


def test_chat_and_streaming(client):
    msgs = [{"role": "user", "content": "add one two"}]
    full = {}
    for e in EXPERTS[:2]:
        r = client.chat.completions.create(model=e, messages=msgs, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.model == e
        full[e] = r.choices[0].message.content
    assert full[EXPERTS[0]] != full[EXPERTS[1]]
    chunks = list(client.chat.completions.create(model=EXPERTS[1], messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks and all(c.model == EXPERTS[1] for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[EXPERTS[1]]
    s = list(client.completions.create(model=EXPERTS[2], prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert all(c.model == EXPERTS[2] for c in s)


def test_unknown_model_is_404_listing_names(client):
    """(`auto` without a router is a 404 too: see test_units, this server has a router.)"""
    import openai

    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="no-such-expert", prompt="x", max_tokens=2)
    msg = str(ei.value)
    assert all(e in msg for e in EXPERTS + ["auto"]), msg


def test_auto_chat_is_routed_by_the_last_user_message(client):
    msgs = [{"role": "user", "content": "please add seven plus nine"},
            {"role": "assistant", "content": "sixteen"},
            {"role": "user", "content": "hello friend, nice weather today"}]
    kw = dict(messages=msgs, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    raw = client.chat.completions.with_raw_response.create(model="auto", **kw)
    assert raw.headers["x-channelmerge-expert"] == "chat"
    r = raw.parse()
    assert r.model == "chat"
    direct = client.chat.completions.with_raw_response.create(model="chat", **kw)
    assert direct.headers["x-channelmerge-expert"] == "chat"
    assert r.choices[0].message.content == direct.parse().choices[0].message.content
    other = client.chat.completions.create(model="math", **kw)
    assert other.choices[0].message.content != r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="auto", stream=True, **kw))
    assert chunks and all(c.model == "chat" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_auto_completion_is_routed_by_the_prompt(client, plugin_run):
    raw = client.completions.with_raw_response.create(model="auto", prompt=PROMPTS[3], max_tokens=MAX_TOKENS,
                                                      temperature=0, extra_body={"ignore_eos": True})
    assert raw.headers["x-channelmerge-expert"] == "code"
    r = raw.parse()
    assert r.model == "code"
    assert r.choices[0].text == _complete(client, "code", 3).choices[0].text == plugin_run["single"]["code"][3]["text"]


def test_concurrent_mixed_requests(client, plugin_run):
    """48 concurrent requests over all experts and prompts: each gets its expert's answer."""
    jobs = [(EXPERTS[i % len(EXPERTS)], (i // len(EXPERTS)) % len(PROMPTS)) for i in range(48)]
    with cf.ThreadPoolExecutor(48) as ex:
        results = list(ex.map(lambda j: _complete(client, *j), jobs))
    assert len(results) == len(jobs) == 48
    for (e, p), r in zip(jobs, results):
        assert r.model == e
        assert r.choices[0].text == plugin_run["single"][e][p]["text"], (e, p)


CHAT = [{"role": "user", "content": "add one two"}]


def _chat_text(client, expert, max_tokens=16):
    r = client.chat.completions.create(model=expert, messages=CHAT, max_tokens=max_tokens, temperature=0)
    assert r.model == expert
    return r.choices[0].message.content


def test_invocations_is_routed_by_its_model(server, http, client):
    """SageMaker's /invocations (no API key in vLLM, on by default) used to bypass the routing:
    `model: "b"` answered by the first expert. Now it resolves `model` like chat does."""
    url = server["url"]
    r = http.post(url + "/invocations", json={"model": "code", "messages": CHAT, "max_tokens": 16, "temperature": 0},
                  timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-channelmerge-expert"] == "code" and r.json()["model"] == "code"
    assert r.json()["choices"][0]["message"]["content"] == _chat_text(client, "code")
    r = http.post(url + "/invocations", json={"model": "b", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 404 and all(e in r.json()["error"]["message"] for e in EXPERTS)
    # a client's vllm_xargs.expert cannot pick another expert than `model`
    r = http.post(url + "/v1/chat/completions", timeout=60,
                  json={"model": "math", "messages": CHAT, "max_tokens": 2, "vllm_xargs": {"expert": "code"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs.expert"
    # a route channelmerge does not route is refused, not answered by some expert
    r = http.post(url + "/v1/chat/completions/batch", json={"model": "code", "messages": [CHAT]}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_supported"


def test_messages_api_answers_as_each_expert(server, http, client):
    """/v1/messages (Anthropic) used to be a 400 for every request (`model` removed)."""
    texts = {}
    for e in EXPERTS[:2]:
        r = http.post(server["url"] + "/v1/messages", timeout=300,
                      json={"model": e, "max_tokens": 16, "temperature": 0, "messages": CHAT})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["model"] == e and r.headers["x-channelmerge-expert"] == e
        texts[e] = "".join(b["text"] for b in j["content"] if b["type"] == "text")
        assert texts[e] == _chat_text(client, e)
    assert texts[EXPERTS[0]] != texts[EXPERTS[1]]
    r = http.post(server["url"] + "/v1/messages", timeout=300, stream=True,
                  json={"model": EXPERTS[1], "max_tokens": 16, "temperature": 0, "messages": CHAT, "stream": True})
    events = [json.loads(line[len("data:"):]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data:") and line[len("data:"):].strip() not in ("", "[DONE]")]
    start = next(ev for ev in events if ev.get("type") == "message_start")
    assert start["message"]["model"] == EXPERTS[1]
    streamed = "".join(ev["delta"].get("text", "") for ev in events if ev.get("type") == "content_block_delta")
    assert streamed == texts[EXPERTS[1]]


def test_requests_without_the_api_key_never_see_expert_names(server):
    """vLLM checks --api-key only under /v1 (and a few prefixes): /tokenize and /invocations
    used to answer an unknown name with the list of experts to anyone."""
    import requests

    url = server["url"]
    for method, path, body in (("POST", "/tokenize", {"model": "zzz", "prompt": "x"}),
                               ("POST", "/invocations", {"model": "zzz", "prompt": "x"}),
                               ("POST", "/v1/completions", {"model": "zzz", "prompt": "x"}),
                               ("GET", "/v1/models", None)):
        r = requests.request(method, url + path, json=body, timeout=60,
                             headers={"Authorization": "Bearer wrong"} if path == "/tokenize" else {})
        assert r.status_code == 401, (path, r.text)
        # ("code" is also a key of OpenAI's error shape)
        assert "Valid model names" not in r.text and "math" not in r.text and "chat" not in r.text, r.text
    assert requests.get(url + "/health", timeout=60).status_code == 200


def test_auto_with_malformed_messages_is_400(server, http):
    for messages, param in ((["hi"], "messages[0]"), ([None], "messages[0]"),
                            ([{"role": "user", "content": 5}], "messages[0].content")):
        r = http.post(server["url"] + "/v1/chat/completions", json={"model": "auto", "messages": messages},
                      timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_request_naming_no_model_is_refused(server, http):
    """The test checkpoint names no default_expert: no silent first expert."""
    r = http.post(server["url"] + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and all(e in err["message"] for e in EXPERTS)
