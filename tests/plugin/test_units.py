"""Unit tests with small fakes: version guard, expert ids, V1/V2 adapters, middleware, serve."""

from __future__ import annotations

import asyncio
import json
import types

import numpy as np
import pytest
import torch

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


# --- expert ids --------------------------------------------------------------------------------

def test_expert_index():
    assert compat.expert_index(None, EXPERTS) == 0
    assert compat.expert_index("chat", EXPERTS) == 2
    assert compat.expert_index(1, EXPERTS) == 1
    for bad in ("nope", 3, -1, True, 1.5):
        with pytest.raises(ValueError, match="math, code, chat"):
            compat.expert_index(bad, EXPERTS)


def test_token_expert_ids_batch_order_and_padding():
    ids = compat.token_expert_ids(np.array([2, 0, 1]), np.array([1, 3, 2]), 8)
    assert ids.tolist() == [2, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        compat.token_expert_ids(np.array([0]), np.array([5]), 4)


def test_step_state_dummy_tokens_and_rows():
    st = compat.StepState()
    st.configure(3)
    # Dummy / profiling run: no ids -> expert 0 everywhere.
    st.begin(None, None, 5, torch.device("cpu"))
    assert st.token_batch(5, torch.device("cpu")).expert_ids.tolist() == [0] * 5
    assert st.rows_batch(torch.zeros(7, 4)).expert_ids.tolist() == [0] * 7
    # Real step: 2 requests (experts 2, 1) with 3 and 1 tokens.
    st.begin(torch.tensor([2, 2, 2, 1]), torch.tensor([2, 1]), 4, torch.device("cpu"))
    assert st.token_batch(4, torch.device("cpu")).expert_ids.tolist() == [2, 2, 2, 1]
    with pytest.raises(RuntimeError, match="rows"):
        st.token_batch(3, torch.device("cpu"))
    hidden = torch.randn(4, 8)
    st.hidden = hidden
    # Sampled rows (a gather, one per request) -> request ids.
    assert st.rows_batch(hidden[torch.tensor([2, 3])]).expert_ids.tolist() == [2, 1]
    # A slice of the hidden states (prompt logprobs) -> those tokens' ids.
    assert st.rows_batch(hidden[1:4]).expert_ids.tolist() == [2, 2, 1]
    with pytest.raises(RuntimeError, match="speculative"):
        st.rows_batch(torch.randn(3, 8))


# --- V1 runner adapter (fake runner) ----------------------------------------------------------------

class _FakeRunnerBase:
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        self.seen = kw
        return "out"


class _FakeV1Runner(compat.ExpertIdsV1Mixin, _FakeRunnerBase):
    def __init__(self, reqs: dict[str, object], order: list[str], counts: list[int]):
        qc = {"experts": EXPERTS}
        self.vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(
            hf_config=types.SimpleNamespace(quantization_config=qc)))
        self.requests = {r: types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=e))
                         for r, e in reqs.items()}
        self.input_batch = types.SimpleNamespace(num_reqs=len(order), req_ids=order)
        qsl = np.zeros(len(order) + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(counts)
        self.query_start_loc = types.SimpleNamespace(np=qsl)


def test_v1_adapter_builds_ids_in_batch_order():
    reqs = {"a": {"expert": "code"}, "b": None, "c": {"expert": "chat"}}
    r = _FakeV1Runner(reqs, ["c", "a", "b"], [2, 1, 3])
    assert r._model_forward(input_ids=torch.zeros(8, dtype=torch.long)) == "out"
    assert r.seen["expert_ids"].tolist() == [2, 2, 1, 0, 0, 0, 0, 0]
    assert r.seen["request_expert_ids"].tolist() == [2, 1, 0]
    # Next step: the batch was condensed and reordered; ids follow the new order.
    r.input_batch = types.SimpleNamespace(num_reqs=2, req_ids=["a", "c"])
    r.query_start_loc = types.SimpleNamespace(np=np.array([0, 1, 2]))
    r._model_forward(input_ids=torch.zeros(2, dtype=torch.long))
    assert r.seen["expert_ids"].tolist() == [1, 2]


# --- V2 model state (fake DefaultModelState) ----------------------------------------------------------

class _FakeDefaultModelState:
    def __init__(self, vllm_config, model, encoder_cache, device):
        self.max_num_reqs = 4
        self.max_num_tokens = 16
        self.added = []

    def add_request(self, req_index, new_req_data):
        self.added.append(req_index)

    def prepare_inputs(self, input_batch, req_states):
        return {"other": 1}

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        return {}


def _new_req(expert):
    return types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args={"expert": expert} if expert else None))


def test_v2_model_state_slots_and_padding():
    cls = compat.make_model_state_cls(_FakeDefaultModelState, EXPERTS)
    st = cls(None, None, None, torch.device("cpu"))
    st.add_request(3, _new_req("chat"))
    st.add_request(0, _new_req("code"))
    st.add_request(1, _new_req(None))
    batch = types.SimpleNamespace(num_reqs=3, idx_mapping=torch.tensor([3, 1, 0]),
                                  num_scheduled_tokens=np.array([2, 1, 3]), num_tokens=6,
                                  num_tokens_after_padding=8)
    out = st.prepare_inputs(batch, None)
    assert out["other"] == 1
    assert out["expert_ids"].tolist() == [2, 2, 0, 1, 1, 1, 0, 0]
    assert out["request_expert_ids"].tolist() == [2, 0, 1]
    buf = out["expert_ids"].data_ptr()
    dummy = st.prepare_dummy_inputs(2, 5)
    assert dummy["expert_ids"].tolist() == [0] * 5
    assert dummy["expert_ids"].data_ptr() == buf  # persistent buffer (CUDA graphs read it)
    with pytest.raises(ValueError, match="unknown expert"):
        st.add_request(2, _new_req("nope"))


# --- middleware (fake ASGI app) -----------------------------------------------------------------------

class _EchoApp:
    """Fake vLLM: records the body, answers JSON or SSE with model="served-name"."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        msg = await receive()
        body = json.loads(msg["body"])
        self.bodies.append(body)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            for i in range(2):
                chunk = json.dumps({"id": i, "model": "served-name", "choices": []})
                # Split an event across two sends to exercise buffering.
                data = f"data: {chunk}\n\n".encode()
                await send({"type": "http.response.body", "body": data[:7], "more_body": True})
                await send({"type": "http.response.body", "body": data[7:], "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        else:
            out = json.dumps({"id": "x", "model": "served-name", "choices": []}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out, "more_body": False})


def _call(app, method, path, body=None):
    sent = []
    raw = json.dumps(body).encode() if body is not None else b""

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    headers = dict(sent[0]["headers"])
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, headers, payload


@pytest.fixture
def routed():
    serving.configure(EXPERTS, model_dir="/m")
    serving.set_router(None)
    inner = _EchoApp()
    yield serving.ExpertRoutingMiddleware(inner), inner
    serving.REGISTRY.experts = None
    serving.set_router(None)


def test_middleware_sets_expert_and_salt(routed):
    mw, inner = routed
    st, headers, payload = _call(mw, "POST", "/v1/chat/completions",
                                 {"model": "code", "messages": [], "cache_salt": "client", "vllm_xargs": {"k": 1}})
    assert st == 200
    body = inner.bodies[-1]
    assert "model" not in body
    assert body["vllm_xargs"] == {"k": 1, "expert": "code"}
    assert body["cache_salt"] == serving.expert_salt("code", "client") != serving.expert_salt("math", "client")
    out = json.loads(payload)
    assert out["model"] == "code"
    assert int(headers[b"content-length"]) == len(payload)
    assert headers[serving.EXPERT_HEADER] == b"code"


def test_middleware_rewrites_stream(routed):
    mw, _ = routed
    st, headers, payload = _call(mw, "POST", "/v1/completions", {"model": "chat", "prompt": "x", "stream": True})
    assert headers[serving.EXPERT_HEADER] == b"chat"
    events = [e for e in payload.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[len("data: "):])["model"] for e in events[:-1]] == ["chat", "chat"]


def test_middleware_unknown_and_auto_are_404(routed):
    mw, inner = routed
    for name, needle in (("nope", "does not exist"), ("auto", "router")):
        st, _, payload = _call(mw, "POST", "/v1/completions", {"model": name, "prompt": "x"})
        assert st == 404
        err = json.loads(payload)["error"]
        assert needle in err["message"] and "math, code, chat" in err["message"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert inner.bodies == []


def test_middleware_router_hook(routed):
    mw, inner = routed
    serving.set_router(lambda body: "chat" if "hi" in str(body.get("prompt")) else "math")
    st, headers, payload = _call(mw, "POST", "/v1/completions", {"model": "auto", "prompt": "hi"})
    assert st == 200 and inner.bodies[-1]["vllm_xargs"]["expert"] == "chat"
    assert headers[serving.EXPERT_HEADER] == b"chat"
    assert json.loads(payload)["model"] == "chat"
    st, _, payload = _call(mw, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(payload)["data"]] == EXPERTS + ["auto"]


def test_middleware_lists_models_and_passes_others(routed):
    mw, inner = routed
    st, _, payload = _call(mw, "GET", "/v1/models")
    assert st == 200 and [m["id"] for m in json.loads(payload)["data"]] == EXPERTS
    assert _call(mw, "GET", "/v1/models/code")[0] == 200
    assert _call(mw, "GET", "/v1/models/zzz")[0] == 404
    st, _, _ = _call(mw, "POST", "/other", {"model": "zzz"})
    assert st == 200 and inner.bodies[-1] == {"model": "zzz"}  # untouched


def test_middleware_installed_twice_routes_once(routed):
    mw, inner = routed
    twice = serving.ExpertRoutingMiddleware(mw)
    _call(twice, "POST", "/v1/completions", {"model": "code", "prompt": "x"})
    assert inner.bodies[-1]["vllm_xargs"] == {"expert": "code"}


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

def _fake_vllm_config(worker_cls="auto", spec=None):
    qc = fmt.ChannelMergedConfig(experts=EXPERTS, num_groups=2).to_dict()
    mc = types.SimpleNamespace(hf_config=types.SimpleNamespace(quantization_config=qc), enforce_eager=False,
                               logits_processors=None, model="/m")
    return types.SimpleNamespace(model_config=mc, parallel_config=types.SimpleNamespace(worker_cls=worker_cls),
                                 speculative_config=spec, use_v2_model_runner=False)


def test_config_hook_sets_worker_eager_and_validator(caplog):
    pytest.importorskip("vllm")
    saved = serving.REGISTRY.experts
    serving.REGISTRY.experts = None
    try:
        cfg = _fake_vllm_config()
        with caplog.at_level("WARNING", logger="vllm_channelmerge"):
            compat.update_vllm_config(cfg)
        assert cfg.parallel_config.worker_cls == "vllm_channelmerge.compat.ChannelMergedCPUWorker"
        assert cfg.model_config.enforce_eager is True
        assert "forcing enforce_eager" in caplog.text
        v = cfg.model_config.logits_processors[-1]
        assert v is compat.ExpertParamsValidator
        v.validate_params(types.SimpleNamespace(extra_args={"expert": "code"}))
        with pytest.raises(ValueError, match="unknown expert"):
            v.validate_params(types.SimpleNamespace(extra_args={"expert": "nope"}))
        assert serving.REGISTRY.experts == EXPERTS
        compat.update_vllm_config(cfg)  # idempotent
        assert cfg.model_config.logits_processors.count(compat.ExpertParamsValidator) == 1
        # The worker classes resolve from their qualified names (what vLLM does).
        from vllm.utils.import_utils import resolve_obj_by_qualname

        w = resolve_obj_by_qualname(cfg.parallel_config.worker_cls)
        assert w.__name__ == "ChannelMergedCPUWorker"
        with pytest.raises(ValueError, match="speculative"):
            compat.update_vllm_config(_fake_vllm_config(spec=object()))
    finally:
        serving.REGISTRY.experts = saved


def test_http_hook_adds_middleware_inside_vllms(monkeypatch):
    import sys

    calls = []
    fake = types.ModuleType("fake_app_module")
    fake.init_entrypoints_middleware = lambda args, app: calls.append(("vllm", app))
    monkeypatch.setitem(sys.modules, compat._APP_MODULE, fake)

    class App:
        def __init__(self):
            self.added = []

        def add_middleware(self, cls):
            self.added.append(cls)
            calls.append(("ours", self))

    assert compat.install_http_hook() and compat.install_http_hook()  # idempotent
    saved = serving.REGISTRY.experts
    try:
        serving.REGISTRY.experts = None  # not a channel-merged model: nothing added
        app = App()
        fake.init_entrypoints_middleware(types.SimpleNamespace(middleware=[]), app)
        assert app.added == []
        serving.REGISTRY.experts = EXPERTS
        calls.clear()
        app = App()
        fake.init_entrypoints_middleware(types.SimpleNamespace(middleware=[]), app)
        assert app.added == [serving.ExpertRoutingMiddleware]
        assert [c[0] for c in calls] == ["ours", "vllm"]  # added first: innermost
        app = App()
        fake.init_entrypoints_middleware(types.SimpleNamespace(middleware=[serving.__name__ + ".ExpertRoutingMiddleware"]), app)
        assert app.added == []
    finally:
        serving.REGISTRY.experts = saved


def test_config_hook_installs_the_router_of_the_model_dir(tmp_path):
    pytest.importorskip("vllm")
    from merge_tool.cli import main
    from vllm_channelmerge.router import RouterError

    d = _merged_config_dir(tmp_path)
    rows = [{"expert": e, "prompt": f"{w} {w} please"} for e, w in zip(EXPERTS, ("sum", "python", "hello"))]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    assert main(["router", "train", str(d), str(tmp_path / "ex.jsonl")]) == 0
    saved = (serving.REGISTRY.experts, serving.REGISTRY.model_dir, serving.REGISTRY.router)
    serving.REGISTRY.experts = serving.REGISTRY.router = None
    try:
        cfg = _fake_vllm_config()
        cfg.model_config.model = str(d)
        compat.update_vllm_config(cfg)
        assert serving.served_names() == EXPERTS + ["auto"]
        assert serving.resolve_model("auto", {"messages": [{"role": "user", "content": "python"}]}) == "code"
        serving.REGISTRY.experts = serving.REGISTRY.router = None
        (d / "router" / "weights.safetensors").write_bytes(b"junk")
        with pytest.raises(RouterError, match="weights.safetensors"):
            compat.update_vllm_config(cfg)
    finally:
        serving.REGISTRY.experts, serving.REGISTRY.model_dir, serving.REGISTRY.router = saved


# --- expert norm loading ----------------------------------------------------------------------

def test_expert_norm_is_loaded_and_checked():
    """`model.norm.expert_weight` goes to the wrapper's own parameter, never to vLLM's loader;
    a missing or misshapen one is a FormatError naming the tensor."""
    pytest.importorskip("vllm")
    from vllm_channelmerge.models import ChannelMergedMixin

    class Stock(torch.nn.Module):  # stands in for vLLM's LlamaForCausalLM
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
            self.config = types.SimpleNamespace(tie_word_embeddings=True)

        def load_weights(self, weights):
            names = set()
            for n, t in weights:
                assert n == "w", f"vLLM's loader got {n}"
                names.add(n)
            return names

    class Wrapped(ChannelMergedMixin, Stock):
        def __init__(self):
            super().__init__()
            self.cm_config = fmt.ChannelMergedConfig(experts=["a", "b"], num_groups=2, expert_norms=["model.norm"])
            self.cm_expert_norm = torch.nn.Parameter(torch.ones(2, 4), requires_grad=False)

    m = Wrapped()
    norm = torch.arange(8.0).reshape(2, 4)
    assert m.load_weights([("w", torch.ones(3)), ("model.norm.expert_weight", norm)]) == {"w", "cm_expert_norm"}
    assert torch.equal(m.cm_expert_norm.data, norm)
    with pytest.raises(fmt.FormatError, match="'model.norm.expert_weight' is missing"):
        Wrapped().load_weights([("w", torch.ones(3))])
    with pytest.raises(fmt.FormatError, match=r"'model.norm.expert_weight' has shape \(3, 4\)"):
        Wrapped().load_weights([("w", torch.ones(3)), ("model.norm.expert_weight", torch.ones(3, 4))])
    with pytest.raises(fmt.FormatError, match="expert_norms"):
        fmt.ChannelMergedConfig.from_dict({**m.cm_config.to_dict(), "expert_norms": ["model.layers.0.input_layernorm"]})
