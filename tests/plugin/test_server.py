"""A real `channelmerge serve` process queried with the `openai` package."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from .conftest import EXPERTS, needs_vllm
from .engine_script import MAX_TOKENS, PROMPTS

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)


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
    for (e, p), r in zip(jobs, results):
        assert r.model == e
        assert r.choices[0].text == plugin_run["single"][e][p]["text"], (e, p)
