"""Unit tests with small fakes: version guard, middleware, serve, config and HTTP hooks
(the runtime adapter's id builders are in test_adapter.py)."""

from __future__ import annotations

import asyncio
import json
import types

import pytest

from vllm_channelmerge import compat, serving
from vllm_channelmerge import format as fmt

EXPERTS = ["math", "code", "chat"]


# --- version guard ----------------------------------------------------------------------------

@pytest.mark.parametrize("v", ["0.32.0", "0.32.5", "0.33.0", "0.33.1+cpu", "0.33.0rc1"])
def test_version_guard_accepts_tested(v):
    assert compat.version_problem(v) is None


@pytest.mark.parametrize("v", ["0.31.2", "0.34.0", "1.0.0", "garbage"])
def test_version_guard_names_the_problem(v, caplog):
    msg = compat.version_problem(v)
    assert msg and "0.32.x" in msg and "0.33.x" in msg
    assert compat.check_vllm_version(v, strict=False) == msg
    with pytest.raises(RuntimeError, match="tested"):
        compat.check_vllm_version(v, strict=True)


def test_installed_vllm_is_tested():
    pytest.importorskip("vllm")
    assert compat.version_problem() is None


# --- middleware (fake ASGI app) -----------------------------------------------------------------------

class _EchoApp:
    """Fake vLLM: records the body, answers JSON or SSE with model="served-name"."""

    def __init__(self):
        self.bodies = []
        self.paths = []

    async def __call__(self, scope, receive, send):
        msg = await receive()
        self.paths.append(scope["path"])
        body = json.loads(msg["body"]) if msg.get("body") else {}
        self.bodies.append(body)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            chunks = [{"id": i, "model": "served-name", "choices": []} for i in range(2)]
            if scope["path"] == "/v1/messages":  # Anthropic: the model sits in message_start
                chunks = [{"type": "message_start", "message": {"id": "m", "model": "served-name"}},
                          {"type": "content_block_delta", "index": 0}]
            for chunk in chunks:
                # Split an event across two sends to exercise buffering.
                data = f"event: x\ndata: {json.dumps(chunk)}\n\n".encode()
                await send({"type": "http.response.body", "body": data[:7], "more_body": True})
                await send({"type": "http.response.body", "body": data[7:], "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        else:
            out = json.dumps({"id": "x", "model": "served-name", "choices": []}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out, "more_body": False})


def _route(path):
    import re

    rx = re.sub(r"\{[^}]+\}", "[^/]+", path)
    return types.SimpleNamespace(path=path, path_regex=re.compile(f"^{rx}$"))


# The route table of a fake vLLM server app: what vLLM 0.32 has, plus one route a future
# vLLM might add (`/v1/future/generate`).
ROUTES = ["/health", "/ping", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/invocations",
          "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions", "/v1/responses",
          "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens",
          "/generative_scoring", "/v1/future/generate"]


def _server_app(api_key=None, served=None, model="/srv/merged"):
    """What the middleware reads from `scope["app"]`: vLLM's app.routes and app.state.args."""
    args = types.SimpleNamespace(api_key=api_key, served_model_name=served, model=model)
    return types.SimpleNamespace(routes=[_route(p) for p in ROUTES], state=types.SimpleNamespace(args=args))


def _call(app, method, path, body=None, headers=(), server=None, raw=None):
    sent = []
    if raw is None:
        raw = json.dumps(body).encode() if body is not None else b""

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                         *headers]}
    if server is not None:
        scope["app"] = server
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    headers = dict(sent[0]["headers"])
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, headers, payload


def _error(payload):
    return json.loads(payload)["error"]


@pytest.fixture
def routed():
    inner = _EchoApp()
    return serving.ExpertRoutingMiddleware(inner, registry=serving.ExpertRegistry(EXPERTS, model_dir="/m")), inner


def test_middleware_sets_expert_salt_and_the_served_name(routed):
    mw, inner = routed
    st, headers, payload = _call(mw, "POST", "/v1/chat/completions",
                                 {"model": "code", "messages": [], "cache_salt": "client", "vllm_xargs": {"k": 1}},
                                 server=_server_app())
    assert st == 200
    body = inner.bodies[-1]
    assert body["model"] == "/srv/merged"  # the name vLLM serves: every endpoint accepts it
    assert body["vllm_xargs"] == {"k": 1, "expert": "code"}
    assert body["cache_salt"] == serving.expert_salt("code", "client") != serving.expert_salt("math", "client")
    out = json.loads(payload)
    assert out["model"] == "code"
    assert int(headers[b"content-length"]) == len(payload)
    assert headers[serving.EXPERT_HEADER] == b"code"
    _call(mw, "POST", "/v1/completions", {"model": "math", "prompt": "x"}, server=_server_app(served=["alias", "b"]))
    assert inner.bodies[-1]["model"] == "alias"


def test_middleware_rewrites_stream(routed):
    mw, _ = routed
    st, headers, payload = _call(mw, "POST", "/v1/completions", {"model": "chat", "prompt": "x", "stream": True})
    assert headers[serving.EXPERT_HEADER] == b"chat"
    events = [e for e in payload.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e.split("data: ", 1)[1])["model"] for e in events[:-1]] == ["chat", "chat"]


def test_messages_keeps_a_model_and_its_stream_names_the_expert(routed):
    """Bug 9: /v1/messages requires `model`; the middleware used to delete it (400 for every
    request). It now carries the served name, and message_start names the expert."""
    mw, inner = routed
    st, headers, payload = _call(mw, "POST", "/v1/messages",
                                 {"model": "code", "max_tokens": 4, "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}, server=_server_app())
    assert st == 200 and inner.bodies[-1]["model"] == "/srv/merged"
    assert inner.bodies[-1]["vllm_xargs"] == {"expert": "code"}
    events = [e for e in payload.decode().split("\n\n") if e.startswith("event")]
    assert json.loads(events[0].split("data: ", 1)[1])["message"]["model"] == "code"
    # count_tokens (name only, model required by vLLM): the served name, no sampling fields
    st, _, _ = _call(mw, "POST", "/v1/messages/count_tokens",
                     {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}, server=_server_app())
    assert st == 200 and inner.bodies[-1]["model"] == "/srv/merged" and "vllm_xargs" not in inner.bodies[-1]


def test_middleware_unknown_and_auto_are_404(routed):
    mw, inner = routed
    for name, needle in (("nope", "does not exist"), ("auto", "router")):
        st, _, payload = _call(mw, "POST", "/v1/completions", {"model": name, "prompt": "x"})
        assert st == 404
        err = _error(payload)
        assert needle in err["message"] and "math, code, chat" in err["message"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert inner.bodies == []


def test_middleware_router_hook(routed):
    mw, inner = routed
    mw.registry.router = lambda body: "chat" if "hi" in str(body.get("prompt")) else "math"
    st, headers, payload = _call(mw, "POST", "/v1/completions", {"model": "auto", "prompt": "hi"})
    assert st == 200 and inner.bodies[-1]["vllm_xargs"]["expert"] == "chat"
    assert headers[serving.EXPERT_HEADER] == b"chat"
    assert json.loads(payload)["model"] == "chat"
    st, _, payload = _call(mw, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(payload)["data"]] == EXPERTS + ["auto"]


def test_middleware_lists_models(routed):
    mw, inner = routed
    st, _, payload = _call(mw, "GET", "/v1/models")
    assert st == 200 and [m["id"] for m in json.loads(payload)["data"]] == EXPERTS
    assert _call(mw, "GET", "/v1/models/code")[0] == 200
    assert _call(mw, "GET", "/v1/models/zzz")[0] == 404
    assert inner.bodies == []


def test_route_policy_refuses_every_unclassified_route(routed):
    """Bug 7: only classified routes get through. A route vLLM has but channelmerge does not
    route (batch chat, stored responses, scoring, one a future vLLM adds), a path no route
    matches, a routed path with another method, a websocket: each refused, vLLM never called."""
    mw, inner = routed
    server = _server_app()
    for method, path, label in (("POST", "/v1/chat/completions/batch", "/v1/chat/completions/batch"),
                                ("GET", "/v1/responses/resp_1", "/v1/responses/{response_id}"),
                                ("POST", "/generative_scoring", "/generative_scoring"),
                                ("POST", "/v1/future/generate", "/v1/future/generate"),
                                ("POST", "/not/a/route", "/not/a/route"),
                                ("GET", "/v1/chat/completions", "/v1/chat/completions"),
                                ("POST", "/v1/models", "/v1/models")):
        st, _, payload = _call(mw, method, path, {"model": "code", "messages": []}, server=server)
        err = _error(payload)
        assert st == 404 and err["code"] == "route_not_supported", (path, payload)
        assert f"channelmerge does not route {method} {label}" in err["message"]
    assert inner.bodies == []
    # model-free routes pass untouched (whatever their body), without the fake app too
    for srv in (server, None):
        st, _, _ = _call(mw, "GET", "/health", server=srv)
        assert st == 200 and inner.paths[-1] == "/health"
    st, _, _ = _call(mw, "POST", "/ping", {"model": "zzz"}, server=server)
    assert st == 200 and inner.bodies[-1] == {"model": "zzz"}
    # without a route table (not a Starlette app): only the known routes get through
    st, _, payload = _call(mw, "POST", "/v1/future/generate", {"model": "code"})
    assert st == 404 and _error(payload)["code"] == "route_not_supported"
    # websockets: none is routed, so closed before accept (the client sees 403)
    sent = []

    async def send(m):
        sent.append(m)

    async def receive():
        return {"type": "websocket.connect"}

    asyncio.run(mw({"type": "websocket", "path": "/v1/realtime", "headers": [], "app": server}, receive, send))
    assert sent and sent[0]["type"] == "websocket.close"


def test_route_policy_is_logged_at_start_up(caplog):
    async def app(scope, receive, send):
        pass

    with caplog.at_level("INFO", logger=serving.__name__):
        asyncio.run(serving.ExpertRoutingMiddleware(app)({"type": "lifespan", "app": _server_app()}, None, None))
    line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    routed_part, refused_part = line.split("refused")
    assert "/invocations" in routed_part and "/v1/future/generate" in refused_part


def test_invocations_is_routed_by_its_own_model(routed):
    """Bug 7: SageMaker's /invocations (a chat or completion body) resolves `model` like
    /v1/chat/completions; it used to bypass the middleware (expert 0, or any vllm_xargs)."""
    mw, inner = routed
    server = _server_app()
    st, headers, payload = _call(mw, "POST", "/invocations",
                                 {"model": "code", "messages": [{"role": "user", "content": "x"}]}, server=server)
    assert st == 200 and headers[serving.EXPERT_HEADER] == b"code" and json.loads(payload)["model"] == "code"
    assert inner.bodies[-1]["vllm_xargs"] == {"expert": "code"} and inner.bodies[-1]["model"] == "/srv/merged"
    st, _, payload = _call(mw, "POST", "/invocations", {"model": "b", "prompt": "x"}, server=server)
    assert st == 404 and "math, code, chat" in _error(payload)["message"]
    # SageMaker's adapter header would replace `model` after routing: refused
    st, _, payload = _call(mw, "POST", "/invocations", {"model": "code", "prompt": "x"}, server=server,
                           headers=[(b"X-Amzn-SageMaker-Adapter-Identifier", b"lora1")])
    assert st == 400 and _error(payload)["code"] == "adapters_not_supported"
    assert len(inner.bodies) == 1


def test_client_vllm_xargs_expert_never_picks_another_expert(routed):
    """A client's vllm_xargs.expert that disagrees with `model` (or names the expert without
    `model`) is refused; one that agrees is kept (it is overwritten with the same name)."""
    mw, inner = routed
    st, _, payload = _call(mw, "POST", "/v1/completions",
                           {"model": "math", "prompt": "x", "vllm_xargs": {"expert": "code"}})
    err = _error(payload)
    assert st == 400 and err["param"] == "vllm_xargs.expert" and "'code'" in err["message"]
    st, _, payload = _call(mw, "POST", "/v1/completions", {"prompt": "x", "vllm_xargs": {"expert": "code"}})
    assert st == 400 and _error(payload)["param"] == "model"
    assert inner.bodies == []
    st, _, _ = _call(mw, "POST", "/v1/completions", {"model": "code", "prompt": "x", "vllm_xargs": {"expert": "code"}})
    assert st == 200 and inner.bodies[-1]["vllm_xargs"] == {"expert": "code"}
    mw.registry.configure(EXPERTS, default_expert="math")
    st, _, _ = _call(mw, "POST", "/v1/completions", {"prompt": "x", "vllm_xargs": {"expert": "code"}})
    assert st == 400 and len(inner.bodies) == 1


def test_request_naming_no_model_uses_default_expert_or_is_refused(routed):
    mw, inner = routed
    for body in ({"prompt": "x"}, {"model": None, "prompt": "x"}, {"model": "", "prompt": "x"}):
        st, _, payload = _call(mw, "POST", "/v1/completions", body)
        err = _error(payload)
        assert st == 400 and err["code"] == "model_required" and err["param"] == "model"
        assert "math, code, chat" in err["message"]
    assert inner.bodies == []
    with pytest.raises(serving.BadRequest):
        mw.registry.resolve_model(None, {})
    # the tokenizer is every expert's: /tokenize needs no model (and picks no expert)
    st, headers, _ = _call(mw, "POST", "/tokenize", {"prompt": "x"}, server=_server_app())
    assert st == 200 and serving.EXPERT_HEADER not in headers and inner.bodies[-1]["model"] == "/srv/merged"
    st, _, _ = _call(mw, "POST", "/tokenize", {"model": "zzz", "prompt": "x"})
    assert st == 404
    with pytest.raises(fmt.FormatError, match="default_expert"):
        mw.registry.configure(EXPERTS, default_expert="zzz")
    with pytest.raises(fmt.FormatError, match="default_expert"):
        serving.ExpertRegistry(EXPERTS, default_expert="zzz")
    mw.registry.configure(EXPERTS, default_expert="chat")
    st, headers, payload = _call(mw, "POST", "/v1/completions", {"prompt": "x"})
    assert st == 200 and inner.bodies[-1]["vllm_xargs"] == {"expert": "chat"}
    assert headers[serving.EXPERT_HEADER] == b"chat" and json.loads(payload)["model"] == "chat"


def test_registry_reads_default_expert_from_the_model_dir(tmp_path, monkeypatch):
    qc = fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2, default_expert="code").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    monkeypatch.setenv(serving.MODEL_DIR_ENV, str(tmp_path))
    empty = serving.ExpertRegistry()  # what a middleware added by --middleware starts with
    assert empty.resolve_model(None, {}) == "code" and empty.experts == EXPERTS


@pytest.mark.parametrize("keys_from", ["args", "env"])
def test_api_key_is_checked_before_any_expert_name(routed, monkeypatch, keys_from):
    """Bug 10: vLLM checks its key only under /v1, /v2, /inference, /cohere; /tokenize with an
    unknown name used to list every expert to anyone. Now every route but the model-free
    ones needs the key (from --api-key, else VLLM_API_KEY, as vLLM reads them)."""
    mw, inner = routed
    if keys_from == "env":
        monkeypatch.setenv(compat.API_KEY_ENV, "sekrit")
        server = _server_app()
    else:
        monkeypatch.delenv(compat.API_KEY_ENV, raising=False)
        server = _server_app(api_key=["other", "sekrit"])
    for method, path, body in (("POST", "/tokenize", {"model": "zzz", "prompt": "x"}),
                               ("POST", "/detokenize", {"model": "zzz", "tokens": [1]}),
                               ("POST", "/invocations", {"model": "zzz", "prompt": "x"}),
                               ("POST", "/v1/completions", {"model": "zzz", "prompt": "x"}),
                               ("GET", "/v1/models", None), ("GET", "/v1/models/zzz", None),
                               ("POST", "/v1/future/generate", {"model": "zzz"})):
        for auth in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"Basic sekrit")]):
            st, _, payload = _call(mw, method, path, body, server=server, headers=auth)
            assert st == 401, (path, auth)
            assert _error(payload)["code"] == "invalid_api_key"
            assert not any(e in _error(payload)["message"] for e in EXPERTS)
    assert inner.bodies == []
    ok = [(b"authorization", b"Bearer sekrit")]
    assert _call(mw, "POST", "/tokenize", {"model": "zzz", "prompt": "x"}, server=server, headers=ok)[0] == 404
    assert _call(mw, "GET", "/v1/models", server=server, headers=ok)[0] == 200
    assert _call(mw, "POST", "/invocations", {"model": "math", "prompt": "x"}, server=server, headers=ok)[0] == 200
    assert _call(mw, "GET", "/health", server=server)[0] == 200  # model-free: vLLM's own rules


@pytest.mark.parametrize("body, param", [
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [None]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
    ({"messages": "hi"}, "messages"),
    ({"prompt": [1, 2, 3]}, "prompt[0]"),
    ({"prompt": []}, "prompt"),
    ({"input": [None]}, "input[0]"),
    ({"input": 5}, "input"),
])
def test_auto_with_a_malformed_body_is_400_naming_the_field(routed, body, param):
    """Bug 11: the router's text extraction raised (a 500) on these; now a 400 naming the field."""
    from vllm_channelmerge.router import request_text

    mw, inner = routed
    mw.registry.router = lambda b: "code" if "python" in request_text(b) else "math"
    st, _, payload = _call(mw, "POST", "/v1/chat/completions", {"model": "auto", **body})
    err = _error(payload)
    assert st == 400 and err["param"] == param, payload
    assert "auto" in err["message"]
    assert inner.bodies == []


def test_router_text_is_capped_and_well_formed_bodies_still_read():
    from vllm_channelmerge.router import ROUTER_MAX_CHARS, request_text

    huge = "python " * 500_000  # 3.5 MB
    assert len(request_text({"prompt": huge})) == ROUTER_MAX_CHARS
    parts = [{"type": "text", "text": huge}, {"type": "text", "text": "never read"}]
    assert request_text({"messages": [{"role": "user", "content": parts}]}) == huge[:ROUTER_MAX_CHARS]
    parts = [{"type": "image_url"}, {"type": "text", "text": "a"}]
    assert request_text({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": parts},
                                      {"role": "assistant", "content": None}]}) == "a"
    assert request_text({"input": [{"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "resp"}]},
                                   {"type": "function_call_output", "output": "x"}]}) == "resp"
    assert request_text({"prompt": ["first", "second"]}) == "first"
    assert request_text({"messages": [], "prompt": "ignored"}) == ""


def test_router_runs_off_the_event_loop(routed):
    """Bug 11: the router is Python on the request's text; it runs in a worker thread, so the
    event loop keeps serving other clients meanwhile."""
    import time as _time

    mw, inner = routed
    threads = []

    def slow_router(body):
        import threading

        threads.append(threading.current_thread())
        _time.sleep(0.3)
        return "code"

    mw.registry.router = slow_router

    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(_time.perf_counter())
                await asyncio.sleep(0.01)

        sent = []

        async def send(m):
            sent.append(m)

        async def receive():
            return {"type": "http.request", "body": json.dumps({"model": "auto", "prompt": "x"}).encode()}

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        await mw({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send)
        t.cancel()
        return ticks, sent

    ticks, sent = asyncio.run(main())
    import threading

    assert threads and threads[0] is not threading.main_thread()
    assert sent[0]["status"] == 200 and inner.bodies[-1]["vllm_xargs"] == {"expert": "code"}
    assert len(ticks) >= 10 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.15


def test_bad_json_is_400_and_big_bodies_are_parsed_off_the_loop(routed):
    mw, inner = routed
    st, _, payload = _call(mw, "POST", "/v1/completions", raw=b"{not json")
    assert st == 400 and _error(payload)["code"] == "invalid_json"
    st, _, payload = _call(mw, "POST", "/v1/completions", raw=b"[1, 2]")
    assert st == 400
    big = "x" * (serving.INLINE_JSON_BYTES + 10)
    st, _, _ = _call(mw, "POST", "/v1/completions", {"model": "math", "prompt": big})
    assert st == 200 and inner.bodies[-1]["prompt"] == big


def test_middleware_installed_twice_routes_once(routed):
    mw, inner = routed
    twice = serving.ExpertRoutingMiddleware(mw, registry=serving.ExpertRegistry(EXPERTS))
    _call(twice, "POST", "/v1/completions", {"model": "code", "prompt": "x"})
    assert inner.bodies[-1]["vllm_xargs"] == {"expert": "code"}


def test_vllm_route_table_is_fully_classified():
    """Every route of vLLM 0.32's real app falls in one class; the generation and name-only
    routes are all there (a vLLM that renamed one would show here)."""
    pytest.importorskip("vllm")
    app = _build_vllm_app([])
    s = serving.RoutePolicy(app.routes).summary()
    assert set(s[serving.GENERATION]) == serving.GENERATION_ROUTES
    assert set(s[serving.NAME_ONLY]) == serving.NAME_ONLY_ROUTES
    assert s[serving.MODELS] == ["/v1/models"]
    assert {"/health", "/ping", "/metrics", "/version", "/openapi.json"} <= set(s[serving.MODEL_FREE])
    assert {"/v1/chat/completions/batch", "/v1/responses/{response_id}", "/generative_scoring",
            "/inference/v1/generate", "/scale_elastic_ep"} <= set(s[serving.REFUSED])
    assert sorted(sum(s.values(), [])) == sorted({r.path for r in app.routes})


def _build_vllm_app(argv, model="/srv/merged"):
    import warnings

    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(model), *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_app(args, ("generate",))


def test_real_vllm_app_with_the_hook_and_an_api_key(monkeypatch, tmp_path):
    """vLLM's own build_app with the plugin's hook (no engine): the middleware finds the app's
    routes and --api-key itself; /tokenize and /invocations, which vLLM leaves open, give 401
    without the key and route with it."""
    pytest.importorskip("vllm")
    import sys

    from starlette.testclient import TestClient

    import vllm.entrypoints.launchers.app  # noqa: F401  (the module the hook wraps)

    saved = sys.modules[compat._APP_MODULE].init_entrypoints_middleware
    try:
        assert compat.install_http_hook()
        app = _build_vllm_app(["--api-key", "sekrit"], model=_merged_config_dir(tmp_path))
        client = TestClient(app, raise_server_exceptions=False)
        for path, body in (("/tokenize", {"model": "zzz", "prompt": "x"}),
                           ("/invocations", {"model": "zzz", "prompt": "x"}),
                           ("/v1/chat/completions", {"model": "zzz", "messages": []})):
            r = client.post(path, json=body)
            assert r.status_code == 401 and "math" not in r.text, (path, r.text)
        key = {"Authorization": "Bearer sekrit"}
        r = client.post("/invocations", json={"model": "zzz", "prompt": "x"}, headers=key)
        assert r.status_code == 404 and "math, code, chat" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions/batch", json={"model": "code", "messages": [[]]}, headers=key)
        assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_supported"
        models = client.get("/v1/models", headers=key).json()["data"]
        assert [m["id"] for m in models] == EXPERTS and models[0]["root"] == str(tmp_path)
    finally:
        sys.modules[compat._APP_MODULE].init_entrypoints_middleware = saved


def test_salt_is_idempotent():
    s = compat.salted("code", None)
    assert compat.salted("code", s) == s
    assert compat.salted("code", "client") == serving.expert_salt("code", "client")
    assert compat.salted("math", s) != s


# --- serve ----------------------------------------------------------------------------------------

def _merged_config_dir(tmp_path, qc=None):
    qc = qc or fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ChannelMergedLlamaForCausalLM"],
                                                      "quantization_config": qc}))
    return tmp_path


def test_serve_command(tmp_path, monkeypatch):
    from vllm_channelmerge import serve

    d = _merged_config_dir(tmp_path)
    monkeypatch.setattr(serve, "_auto_middleware_available", lambda: True)
    cmd = serve.build_command(str(d), ["--port", "9000"], python="py")
    assert cmd == ["py", "-m", serve.SERVER_MODULE, "--model", str(d), "--port", "9000"]
    monkeypatch.setattr(serve, "_auto_middleware_available", lambda: False)
    cmd = serve.build_command(str(d), [], python="py")
    assert cmd[-2:] == ["--middleware", serve.MIDDLEWARE]


def test_serve_rejects_bad_checkpoint_before_starting(tmp_path):
    from vllm_channelmerge import serve

    with pytest.raises(fmt.FormatError, match="config.json"):
        serve.build_command(str(tmp_path), [])
    qc = fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2).to_dict()
    qc["format_version"] = 99
    d = _merged_config_dir(tmp_path, qc)
    with pytest.raises(fmt.FormatError, match="format_version"):
        serve.build_command(str(d), [])


def test_http_hook_available_on_this_vllm():
    pytest.importorskip("vllm")
    assert compat.http_hook_available()


# --- config hook and HTTP hook (fake configs / fake app module) ------------------------------------

def _fake_vllm_config(worker_cls="auto", spec=None, model="/m", default_expert=None, served=None):
    qc = fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2, default_expert=default_expert).to_dict()
    mc = types.SimpleNamespace(hf_config=types.SimpleNamespace(quantization_config=qc), enforce_eager=False,
                               logits_processors=None, model=model, served_model_name=served or model)
    return types.SimpleNamespace(model_config=mc, parallel_config=types.SimpleNamespace(worker_cls=worker_cls),
                                 speculative_config=spec, use_v2_model_runner=False)


def test_config_hook_sets_worker_eager_and_admission(caplog, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setattr(fmt, "check_checkpoint_experts", lambda *a: None)  # no shards here
    cfg = _fake_vllm_config(model=str(tmp_path), default_expert="chat", served="alias")
    with caplog.at_level("WARNING", logger="vllm_channelmerge"):
        compat.update_vllm_config(cfg)
    assert cfg.parallel_config.worker_cls == "vllm_channelmerge.compat.ChannelMergedCPUWorker"
    assert cfg.model_config.enforce_eager is True
    assert "forcing enforce_eager" in caplog.text
    from vllm.v1.engine.input_processor import InputProcessor

    assert getattr(InputProcessor.process_inputs, "_channelmerge", False)
    compat.update_vllm_config(cfg)  # idempotent
    assert getattr(InputProcessor.process_inputs, "_channelmerge", False)
    # The worker classes resolve from their qualified names (what vLLM does).
    from vllm.utils.import_utils import resolve_obj_by_qualname

    w = resolve_obj_by_qualname(cfg.parallel_config.worker_cls)
    assert w.__name__ == "ChannelMergedCPUWorker"
    with pytest.raises(ValueError, match="speculative"):
        compat.update_vllm_config(_fake_vllm_config(spec=object(), model=str(tmp_path)))


def test_registry_for_model_reads_the_checkpoint(tmp_path):
    """The HTTP hook's registry: the checkpoint's experts, default expert and the name vLLM
    serves; a model that is not a channel-merged folder gets none (no middleware)."""
    qc = fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2, default_expert="chat").to_dict()
    (tmp_path / "m").mkdir()
    d = _merged_config_dir(tmp_path / "m", qc)
    r = serving.registry_for_model(str(d), ["alias", "other"])
    assert r.experts == EXPERTS and r.default_expert == "chat" and r.served_name == "alias"
    assert r.resolve_model(None, {}) == "chat" and r.model_dir == str(d)
    assert serving.registry_for_model(None) is None
    assert serving.registry_for_model(str(tmp_path / "absent")) is None
    assert serving.registry_for_model("meta-llama/Llama-3.2-1B") is None  # a hub name
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert serving.registry_for_model(str(tmp_path / "plain")) is None
    qc["format_version"] = 99  # channel-merged but unreadable: refused, naming the field
    _merged_config_dir(tmp_path / "m", qc)
    with pytest.raises(fmt.FormatError, match="format_version"):
        serving.registry_for_model(str(d))


def test_http_hook_adds_middleware_inside_vllms(monkeypatch, tmp_path):
    import sys

    calls = []
    fake = types.ModuleType("fake_app_module")
    fake.init_entrypoints_middleware = lambda args, app: calls.append(("vllm", app))
    monkeypatch.setitem(sys.modules, compat._APP_MODULE, fake)

    class App:
        def __init__(self):
            self.added = []

        def add_middleware(self, cls, **kw):
            self.added.append((cls, kw))
            calls.append(("ours", self))

    assert compat.install_http_hook() and compat.install_http_hook()  # idempotent
    app = App()  # not a channel-merged model: nothing added
    fake.init_entrypoints_middleware(types.SimpleNamespace(middleware=[], model=str(tmp_path)), app)
    assert app.added == []
    d = _merged_config_dir(tmp_path)
    calls.clear()
    app = App()
    fake.init_entrypoints_middleware(types.SimpleNamespace(middleware=[], model=str(d), served_model_name=None), app)
    [(cls, kw)] = app.added
    assert cls is serving.ExpertRoutingMiddleware and kw["registry"].experts == EXPERTS
    assert [c[0] for c in calls] == ["ours", "vllm"]  # added first: innermost
    app = App()
    fake.init_entrypoints_middleware(types.SimpleNamespace(
        middleware=[serving.__name__ + ".ExpertRoutingMiddleware"], model=str(d)), app)
    assert app.added == []


def test_config_hook_installs_the_router_of_the_model_dir(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setattr(fmt, "check_checkpoint_experts", lambda *a: None)  # no shards here
    from merge_tool.cli import main
    from vllm_channelmerge.router import RouterError

    d = _merged_config_dir(tmp_path)
    rows = [{"expert": e, "prompt": f"{w} {w} please"} for e, w in zip(EXPERTS, ("sum", "python", "hello"))]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    assert main(["router", "train", str(d), str(tmp_path / "ex.jsonl")]) == 0
    cfg = _fake_vllm_config()
    cfg.model_config.model = str(d)
    compat.update_vllm_config(cfg)  # the router loads: start-up goes on
    registry = serving.registry_for_model(str(d))  # what the HTTP hook gives the middleware
    assert registry.served_names() == EXPERTS + ["auto"]
    assert registry.resolve_model("auto", {"messages": [{"role": "user", "content": "python"}]}) == "code"
    (d / "router" / "weights.safetensors").write_bytes(b"junk")
    with pytest.raises(RouterError, match="weights.safetensors"):
        compat.update_vllm_config(cfg)
