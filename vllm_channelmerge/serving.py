"""HTTP half of the request path: the OpenAI `model` name picks the expert.

A pure ASGI middleware (no vLLM import, no framework). The plugin adds it inside vLLM's own
middleware (``compat.install_http_hook``); ``--middleware
vllm_channelmerge.serving.ExpertRoutingMiddleware`` adds it outside them. Either way it

1. sorts every route of the server app into one class (:class:`RoutePolicy`, built from
   ``app.routes`` at start-up, once vLLM and its SageMaker bootstrap have added them all):
   *generation* routes are routed by expert, *name-only* routes (tokenizer) have their
   ``model`` checked, ``/v1/models`` is answered here, a small allowlist of *model-free*
   routes (health, metrics, docs, ...) passes untouched, and **every other route is
   refused** (404, ``route_not_supported``): a route a later vLLM adds stays closed until
   someone classifies it here;
2. checks the server's API key itself (``--api-key`` / ``VLLM_API_KEY``, as vLLM reads them)
   on every route but the model-free ones, before any expert name can appear in an answer:
   vLLM's own check covers only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``, which
   leaves ``/tokenize`` and ``/invocations`` open;
3. resolves the body's ``model`` to an expert (:meth:`ExpertRegistry.resolve_model`: unknown names, and
   ``auto`` without a router, get a 404 listing the valid names; no ``model`` is the
   checkpoint's ``default_expert`` or a 400); ``auto`` asks the router, in a worker thread;
4. sets ``vllm_xargs.expert`` (vLLM copies it to ``SamplingParams.extra_args["expert"]``) and
   a per-expert ``cache_salt``, so prefix caching never hands one expert's KV blocks to
   another, and sets ``model`` to the name vLLM serves (every endpoint accepts it; the
   Anthropic ``/v1/messages`` requires one). A client ``vllm_xargs.expert`` that differs from
   the resolved expert is refused (400), never obeyed;
5. rewrites ``model`` in the response (JSON and every SSE event) to the expert's name and
   adds the header ``x-channelmerge-expert: <name>``.

Each middleware owns an :class:`ExpertRegistry` (the expert names, default expert and the
router, ``router/`` beside them): the plugin's HTTP hook builds it from the server's
``--model`` checkpoint (:func:`registry_for_model`); one added by ``--middleware`` reads
``CHANNELMERGE_MODEL_DIR`` (set by ``channelmerge serve``) or the server's ``--model``
argument on first use. No module state: two apps in one process never share names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "CHANNELMERGE_MODEL_DIR"
EXPERT_XARG = "expert"
EXPERT_HEADER = b"x-channelmerge-expert"  # response header: the expert that answered
SALT_PREFIX = "channelmerge-expert:"

# --- route policy (see RoutePolicy) ---------------------------------------------------------
# POST routes whose body is a generation request: model -> vllm_xargs.expert + cache_salt.
# /invocations is SageMaker's: vLLM validates its body as a chat, then a completion request,
# both of which carry vllm_xargs and cache_salt, so it is routed like them.
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses",
                               "/v1/messages", "/invocations"})
# POST routes that carry a `model` but no sampling (one tokenizer for every expert): the name
# is checked, no expert is needed.
NAME_ONLY_ROUTES = frozenset({"/tokenize", "/detokenize", "/v1/messages/count_tokens"})
MODELS_ROUTE = "/v1/models"  # GET, and GET /v1/models/{name}: answered here
# Routes known to carry no model and to answer nothing expert-specific: passed untouched
# (any method; vLLM's own rules, API key included, apply).
MODEL_FREE_ROUTES = frozenset({"/health", "/ping", "/version", "/load", "/metrics",
                               "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
GENERATION, NAME_ONLY, MODELS, MODEL_FREE, REFUSED = "generation", "name-only", "models", "model-free", "refused"
# A SageMaker header that makes vLLM replace `model` after this middleware ran.
ADAPTER_HEADER = b"x-amzn-sagemaker-adapter-identifier"
# Request bodies larger than this are parsed and serialised in a worker thread.
INLINE_JSON_BYTES = 256 * 1024

Router = Callable[[Mapping[str, Any]], str]
"""A router picks an expert for an `auto` request from the request body."""


class UnknownModel(LookupError):
    def __init__(self, name: object, valid: list[str], reason: str = ""):
        self.name = name
        self.valid = valid
        msg = reason or f"The model {name!r} does not exist."
        super().__init__(f"{msg} Valid model names: {', '.join(valid)}")


class BadRequest(ValueError):
    """A request the middleware refuses with a 400; ``param`` names the field. A custom
    router (:attr:`ExpertRegistry.router`) may raise it too."""

    def __init__(self, message: str, param: Optional[str] = "model", code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ExpertRegistry:
    """The experts one server app routes to: names, default expert, the name vLLM serves and
    the optional `auto` router. Each middleware owns one (no module state). One made empty
    (``--middleware``) reads them on first use from ``CHANNELMERGE_MODEL_DIR`` or the
    server's ``--model`` argument."""

    def __init__(self, experts: Optional[list[str]] = None, model_dir: Optional[str] = None,
                 router: Optional[Router] = None, default_expert: Optional[str] = None,
                 served_name: Any = None) -> None:
        self.experts: Optional[list[str]] = None
        self.model_dir: Optional[str] = None
        self.default_expert: Optional[str] = None
        self.router: Optional[Router] = router
        self.served_name: Optional[str] = _first_name(served_name)  # the name vLLM serves
        if experts is not None:
            self.configure(experts, model_dir, default_expert)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, served_name: Any = None) -> "ExpertRegistry":
        """The registry of a merged checkpoint folder: its config's experts and default
        expert, and its ``router/`` (a bad router directory raises, naming the file)."""
        cfg = merged_config_from_dir(model_dir)
        return cls(cfg.experts, str(model_dir), load_router(model_dir, cfg.experts), cfg.default_expert,
                   served_name)

    def configure(self, experts: list[str], model_dir: Optional[str] = None,
                  default_expert: Optional[str] = None) -> None:
        """Set the experts and the expert of a request naming none (``default_expert``;
        None: such requests are refused)."""
        experts = fmt.validate_expert_names(list(experts))
        if default_expert is not None and default_expert not in experts:
            raise fmt.FormatError(f"default_expert {default_expert!r} is not one of the experts ({', '.join(experts)})")
        self.experts, self.model_dir, self.default_expert = experts, model_dir, default_expert

    def load(self) -> list[str]:
        if self.experts is None:
            d = os.environ.get(MODEL_DIR_ENV) or _model_from_argv(sys.argv)
            if not d:
                raise RuntimeError(
                    "channelmerge middleware: no expert names known; set "
                    f"{MODEL_DIR_ENV} to the merged checkpoint directory or use `channelmerge serve`"
                )
            found = ExpertRegistry.from_model_dir(d)
            self.configure(found.experts, d, found.default_expert)
            if self.router is None:
                self.router = found.router
        return self.experts

    def served_names(self) -> list[str]:
        names = list(self.load())
        if self.router is not None:
            names.append(fmt.AUTO_MODEL_NAME)
        return names

    def resolve_model(self, name: object, body: Mapping[str, Any]) -> str:
        """The expert that serves a request whose OpenAI `model` field is `name`.

        No `model` (absent, null or "") is the checkpoint's ``default_expert`` when the merge
        config named one, else a :class:`BadRequest` listing the experts: never a silent first
        expert. `auto` asks :attr:`router` (this call runs it: the middleware calls this in a
        worker thread for `auto`); without one it is unknown.
        """
        experts = self.load()
        if name is None or name == "":
            if self.default_expert is not None:
                return self.default_expert
            raise BadRequest("This server serves several experts and the request names none: set "
                             f"'model' to one of: {', '.join(self.served_names())}", "model", "model_required")
        if name == fmt.AUTO_MODEL_NAME:
            if self.router is None:
                raise UnknownModel(name, self.served_names(),
                                   "The model 'auto' needs a router, and this checkpoint has none.")
            picked = self._run_router(body)
            if picked not in experts:
                raise UnknownModel(picked, self.served_names(), f"The router picked unknown expert {picked!r}.")
            return picked
        if isinstance(name, str) and name in experts:
            return name
        raise UnknownModel(name, self.served_names())

    def _run_router(self, body: Mapping[str, Any]) -> str:
        try:
            return self.router(body)
        except BadRequest:
            raise
        except ValueError as e:
            param = getattr(e, "param", None)  # router.RequestTextError: a body it cannot read
            if param is None:
                raise
            raise BadRequest(f"model 'auto' cannot read this request: {e}", param, "invalid_value") from None


def registry_for_model(model: Any, served_name: Any = None) -> Optional[ExpertRegistry]:
    """The registry of the server's ``--model`` when it is a channel-merged checkpoint folder,
    else None (another model: the middleware is not installed)."""
    if not model or not os.path.isdir(str(model)):
        return None
    try:
        cfg = json.loads((Path(str(model)) / fmt.CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # vLLM itself reports an unreadable config
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        return None
    return ExpertRegistry.from_model_dir(str(model), served_name)


def load_router(model_dir: str | os.PathLike, experts: list[str]) -> Optional[Router]:
    """The `auto` router stored in ``model_dir/router/``, or None when there is none.

    Raises ``router.RouterError`` (naming the file) for a router directory that cannot be
    read, or one that can pick an expert the checkpoint does not have.
    """
    d = Path(model_dir) / fmt.ROUTER_DIR
    if not d.exists():
        return None
    from vllm_channelmerge.router import Router as _TrainedRouter

    r = _TrainedRouter.load(d, experts=experts)
    log.info("channelmerge: model 'auto' routes by %s (experts %s)", d, ", ".join(r.experts))
    return r


def merged_config_from_dir(model_dir: str | os.PathLike) -> fmt.ChannelMergedConfig:
    cfg_path = Path(model_dir) / fmt.CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fmt.FormatError(f"{cfg_path}: cannot read ({e})") from None
    return fmt.read_quant_config(cfg, str(cfg_path))


def experts_from_dir(model_dir: str | os.PathLike) -> list[str]:
    return merged_config_from_dir(model_dir).experts


def _model_from_argv(argv: list[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    # `vllm serve DIR`: the first positional after "serve".
    if "serve" in argv:
        i = argv.index("serve")
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            return argv[i + 1]
    return None


def _first_name(names: Any) -> Optional[str]:
    """vLLM serves a list of names (``--served-model-name a b``) and accepts any of them."""
    if isinstance(names, (list, tuple)):
        names = names[0] if names else None
    return str(names) if names else None


def expert_salt(expert: str, client_salt: object = None) -> str:
    """Per-expert prefix-cache salt; a client's own salt stays part of it."""
    s = SALT_PREFIX + expert
    if client_salt:
        s += ":" + str(client_salt)
    return s


def rewrite_request(body: dict[str, Any], expert: Optional[str], generation: bool,
                    served_name: Optional[str] = None) -> dict[str, Any]:
    """The body vLLM gets: ``model`` set to the name vLLM serves (removed when it is not
    known), and for generation the expert in ``vllm_xargs`` and ``cache_salt``."""
    body = dict(body)
    if served_name:
        body["model"] = served_name
    else:
        body.pop("model", None)
    if generation:
        xargs = body.get("vllm_xargs")
        xargs = dict(xargs) if isinstance(xargs, Mapping) else {}
        xargs[EXPERT_XARG] = expert
        body["vllm_xargs"] = xargs
        body["cache_salt"] = expert_salt(expert, body.get("cache_salt"))
    return body


def error_body(message: str, code: int = 404, param: Optional[str] = "model",
               type_: str = "invalid_request_error", err_code: Optional[str] = "model_not_found") -> bytes:
    """OpenAI's error shape (``code`` is the HTTP status, kept for callers; unused)."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": err_code}}).encode()


def models_body(names: list[str], model_dir: Optional[str] = None) -> bytes:
    now = int(time.time())
    return json.dumps({"object": "list", "data": [_model_card(n, now, model_dir) for n in names]}).encode()


def _model_card(name: str, now: int, model_dir: Optional[str]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": now, "owned_by": "channelmerge",
            "root": model_dir or name, "parent": None}


# --- route policy ---------------------------------------------------------------------------

def classify_template(method: str, template: str) -> str:
    """The class of a request to the route ``template`` (``/v1/responses/{response_id}``)."""
    if template in MODEL_FREE_ROUTES:
        return MODEL_FREE
    if template == MODELS_ROUTE or template.startswith(MODELS_ROUTE + "/"):
        return MODELS if method in ("GET", "HEAD") else REFUSED
    if template in GENERATION_ROUTES:
        return GENERATION if method == "POST" else REFUSED
    if template in NAME_ONLY_ROUTES:
        return NAME_ONLY if method == "POST" else REFUSED
    return REFUSED


class RoutePolicy:
    """Which class each route of the server app is in (see the module docstring).

    Built from the app's route table (``app.routes``: Starlette routes and mounts, matched by
    their ``path_regex``); without one (an app that is not Starlette's), from the route
    templates above, matched exactly. A path no route matches is refused like a route
    nobody classified: the request never reaches vLLM.
    """

    def __init__(self, routes: Optional[Iterable[Any]] = None):
        self.table: list[tuple[str, Any]] = []  # (template, compiled path regex)
        if routes is None:
            known = GENERATION_ROUTES | NAME_ONLY_ROUTES | MODEL_FREE_ROUTES | {MODELS_ROUTE}
            self.table = [(t, re.compile("^" + re.escape(t) + "$")) for t in sorted(known)]
            self.from_app = False
        else:
            for r in routes:
                template, rx = getattr(r, "path", None), getattr(r, "path_regex", None)
                if isinstance(template, str) and rx is not None:
                    self.table.append((template, rx))
            self.from_app = True

    def template(self, path: str) -> Optional[str]:
        if path == MODELS_ROUTE or path.startswith(MODELS_ROUTE + "/"):
            return path if path == MODELS_ROUTE else MODELS_ROUTE + "/{model}"
        for template, rx in self.table:
            if rx.match(path):
                return template
        return None

    def classify(self, method: str, path: str) -> tuple[str, str]:
        """(class, route label for messages) of one request."""
        template = self.template(path)
        if template is None:
            return REFUSED, path
        return classify_template(method, template), template

    def summary(self) -> dict[str, list[str]]:
        """Route templates per class (each template once, with the methods it routes)."""
        out: dict[str, list[str]] = {}
        for template, _ in self.table:
            kind = classify_template("POST", template)
            if kind == REFUSED:
                kind = classify_template("GET", template)
            if template not in out.setdefault(kind, []):
                out[kind].append(template)
        return out


class _ServerInfo:
    """What the middleware learns from the server app (``scope["app"]``) once: its route
    policy, its API keys and the model name vLLM serves."""

    def __init__(self, app: Any, registry: ExpertRegistry):
        self.app = app
        routes = getattr(app, "routes", None)
        self.policy = RoutePolicy(routes if isinstance(routes, (list, tuple)) else None)
        from vllm_channelmerge import compat  # vLLM's server settings are read there

        keys, served = compat.server_settings(app)
        self.key_hashes = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]
        self.served_name = _first_name(served) or registry.served_name

    def authorized(self, scope: Mapping[str, Any]) -> bool:
        if not self.key_hashes:
            return True
        value = ""
        for k, v in scope.get("headers", []):
            if k.lower() == b"authorization":
                value = v.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        h = hashlib.sha256(token.encode("utf-8")).digest()
        ok = False
        for t in self.key_hashes:  # no early exit: constant time over the keys
            ok |= secrets.compare_digest(h, t)
        return ok

    def log_summary(self) -> None:
        s = self.policy.summary()
        log.info("channelmerge: HTTP routes by expert: %s; name check only: %s; model-free: %s; "
                 "refused (not routed by channelmerge): %s%s",
                 ", ".join(s.get(GENERATION, [])), ", ".join(s.get(NAME_ONLY, [])),
                 ", ".join(s.get(MODEL_FREE, [])), ", ".join(s.get(REFUSED, [])) or "none",
                 "" if self.policy.from_app else " (no route table: known routes only)")


Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _ResponseRewriter:
    """Wraps `send`: sets `model` to the expert name in a JSON body or in every SSE event."""

    def __init__(self, send: Send, expert: str):
        self.send = send
        self.expert = expert
        self.start: Optional[dict] = None
        self.mode = "pass"
        self.buf = b""

    async def __call__(self, message: dict) -> None:
        t = message["type"]
        if t == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != EXPERT_HEADER]
            headers.append((EXPERT_HEADER, self.expert.encode()))
            message = {**message, "headers": headers}
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
            if ctype.startswith(b"application/json"):
                self.mode = "json"
                self.start = {**message, "headers": headers}
                return  # sent once the body is complete (its length changes)
            if ctype.startswith(b"text/event-stream"):
                self.mode = "sse"
                message = {**message, "headers": [(k, v) for k, v in headers if k.lower() != b"content-length"]}
            return await self.send(message)
        if t != "http.response.body":
            return await self.send(message)
        more = message.get("more_body", False)
        if self.mode == "json":
            self.buf += message.get("body", b"")
            if more:
                return
            body = self._fix_json(self.buf)
            headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            return await self.send({"type": "http.response.body", "body": body, "more_body": False})
        if self.mode == "sse":
            self.buf += message.get("body", b"")
            out = []
            while True:
                # Events end with a blank line; vLLM writes "\n\n".
                i = self.buf.find(b"\n\n")
                if i < 0:
                    break
                event, self.buf = self.buf[: i + 2], self.buf[i + 2:]
                out.append(self._fix_event(event))
            if not more and self.buf:
                out.append(self._fix_event(self.buf))
                self.buf = b""
            if out or not more:
                return await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})
            return
        return await self.send(message)

    def _fix_json(self, raw: bytes) -> bytes:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return raw
        changed = False
        if isinstance(obj, dict):
            # Top level (completions, chat, messages), nested in responses API events
            # ("response") and in the Anthropic stream's message_start event ("message").
            for holder in (obj, obj.get("response"), obj.get("message")):
                if isinstance(holder, dict) and "model" in holder:
                    holder["model"] = self.expert
                    changed = True
        return json.dumps(obj).encode() if changed else raw

    def _fix_event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for j, line in enumerate(lines):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    fixed = self._fix_json(payload)
                    if fixed is not payload:
                        lines[j] = b"data: " + fixed
        return b"\n".join(lines)


class ExpertRoutingMiddleware:
    """ASGI middleware: OpenAI `model` name -> expert, and the route policy (see the module
    docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], registry: Optional[ExpertRegistry] = None,
                 **_: Any):
        self.app = app
        # The plugin's HTTP hook passes the checkpoint's registry; `--middleware` gives none,
        # and an empty one finds the checkpoint on first use.
        self.registry = registry if registry is not None else ExpertRegistry()
        self._info: Optional[_ServerInfo] = None

    def _server(self, scope: Scope) -> _ServerInfo:
        """The server app's info, learnt at start-up (lifespan) or at the first request: by
        then vLLM has added every route, the SageMaker bootstrap's included."""
        server = scope.get("app")
        if self._info is None or self._info.app is not server:
            self._info = _ServerInfo(server, self.registry)
            self._info.log_summary()
        return self._info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if scope.get("channelmerge.routed") or kind not in ("http", "websocket"):
            if kind == "lifespan" and not scope.get("channelmerge.routed"):
                self._server(scope)
            return await self.app(scope, receive, send)  # lifespan, or installed twice
        scope = {**scope, "channelmerge.routed": True}
        info = self._server(scope)
        path, root = scope.get("path", ""), scope.get("root_path") or ""
        if root and path.startswith(root):  # as vLLM's own API-key check does
            path = path[len(root):]
        if kind == "websocket":  # no websocket route carries an expert: closed (403)
            await send({"type": "websocket.close", "code": 1008,
                        "reason": f"channelmerge does not route websocket {path}"})
            return
        method = scope.get("method", "GET")
        if method == "OPTIONS":  # CORS preflight: no body, no model
            return await self.app(scope, receive, send)
        cls, label = info.policy.classify(method, path)
        if cls == MODEL_FREE:
            return await self.app(scope, receive, send)
        if not info.authorized(scope):
            return await _respond(send, 401, error_body(
                "Unauthorized: this server needs its API key as 'Authorization: Bearer <key>'.",
                param=None, err_code="invalid_api_key"))
        if cls == MODELS:
            return await self._models(path, send)
        if cls == REFUSED:
            return await _respond(send, 404, error_body(
                f"channelmerge does not route {method} {label}: this server serves channel-merged "
                "experts and answers only the routes it can route by expert (see channelmerge's "
                "docs/serving.md, 'Route policy').", param=None, err_code="route_not_supported"))
        return await self._route(scope, receive, send, info, cls == GENERATION)

    async def _route(self, scope: Scope, receive: Receive, send: Send, info: _ServerInfo,
                     generation: bool) -> None:
        raw = await _read_body(receive)
        big = len(raw) > INLINE_JSON_BYTES
        try:
            body = await asyncio.to_thread(_parse, raw) if big else _parse(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await _respond(send, 400, error_body("The request body must be a JSON object.",
                                                        param=None, err_code="invalid_json"))
        try:
            expert = await self._expert(scope, body, generation)
        except UnknownModel as e:
            return await _respond(send, 404, error_body(str(e)))
        except BadRequest as e:
            return await _respond(send, 400, error_body(str(e), param=e.param, err_code=e.code))
        new = rewrite_request(body, expert, generation, info.served_name)
        new_raw = await asyncio.to_thread(_dump, new) if big else _dump(new)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_raw)).encode()))
        scope = {**scope, "headers": headers}
        out = _ResponseRewriter(send, expert) if expert is not None else send
        await self.app(scope, _replay(new_raw, receive), out)

    async def _expert(self, scope: Scope, body: dict, generation: bool) -> Optional[str]:
        """The expert of a request (None: a name-only request naming no model)."""
        if any(k.lower() == ADAPTER_HEADER for k, _ in scope.get("headers", [])):
            raise BadRequest("The SageMaker adapter header would replace 'model' after routing; "
                             "this server has no adapters: name the expert in 'model'.",
                             "model", "adapters_not_supported")
        name = body.get("model")
        if not generation and (name is None or name == ""):
            self.registry.load()
            return None  # one tokenizer for every expert: nothing to pick
        if name == fmt.AUTO_MODEL_NAME:
            # The router is Python on the request's text: off the event loop.
            expert = await asyncio.to_thread(self.registry.resolve_model, name, body)
        else:
            expert = self.registry.resolve_model(name, body)
        if generation:
            xargs = body.get("vllm_xargs")
            asked = xargs.get(EXPERT_XARG) if isinstance(xargs, Mapping) else None
            if asked is not None and asked != expert:
                raise BadRequest(f"vllm_xargs.expert is {asked!r} but the request is routed to expert "
                                 f"{expert!r}: name the expert with 'model' only.",
                                 "vllm_xargs.expert", "conflicting_expert")
        return expert

    async def _models(self, path: str, send: Send) -> None:
        names = self.registry.served_names()
        if path == MODELS_ROUTE:
            return await _respond(send, 200, models_body(names, self.registry.model_dir))
        name = path[len(MODELS_ROUTE) + 1:]
        if name not in names:
            return await _respond(send, 404, error_body(str(UnknownModel(name, names))))
        return await _respond(send, 200, json.dumps(_model_card(name, int(time.time()), self.registry.model_dir)).encode())


def _parse(raw: bytes) -> Any:
    return json.loads(raw) if raw else {}


def _dump(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            break
        chunks.append(m.get("body", b""))
        if not m.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    sent = False

    async def _receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # later: disconnect notifications from the real client

    return _receive
