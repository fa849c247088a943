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


def test_models_lists_every_expert(client):
    assert [m.id for m in client.models.list().data] == EXPERTS


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
    import openai

    for name in ("no-such-expert", "auto"):
        with pytest.raises(openai.NotFoundError) as ei:
            client.completions.create(model=name, prompt="x", max_tokens=2)
        msg = str(ei.value)
        assert all(e in msg for e in EXPERTS), msg


def test_concurrent_mixed_requests(client, plugin_run):
    """48 concurrent requests over all experts and prompts: each gets its expert's answer."""
    jobs = [(EXPERTS[i % len(EXPERTS)], (i // len(EXPERTS)) % len(PROMPTS)) for i in range(48)]
    with cf.ThreadPoolExecutor(48) as ex:
        results = list(ex.map(lambda j: _complete(client, *j), jobs))
    for (e, p), r in zip(jobs, results):
        assert r.model == e
        assert r.choices[0].text == plugin_run["single"][e][p]["text"], (e, p)
