"""HTTP half of the request path: the OpenAI `model` name picks the expert.

A pure ASGI middleware (no vLLM import, no framework) that vLLM's OpenAI server loads with
``--middleware vllm_channelmerge.serving.ExpertRoutingMiddleware`` (``channelmerge serve``
adds the flag). For every generation request it

1. resolves the body's ``model`` to an expert name (:func:`resolve_model`; unknown names,
   and ``auto`` while no router is installed, get a 404 in OpenAI's error shape listing the
   valid names); ``auto`` asks the router (:func:`set_router`, or ``router/`` of the model
   directory, loaded by :func:`load_router`) which expert reads the prompt;
2. sets ``vllm_xargs.expert`` (vLLM copies it to ``SamplingParams.extra_args["expert"]``,
   which the worker turns into per-token expert ids) and a per-expert ``cache_salt``
   (combined with the client's own salt), so prefix caching never hands one expert's KV
   blocks to another;
3. removes ``model`` from the body, so vLLM's own name check accepts it whatever
   ``--served-model-name`` says, and rewrites ``model`` in the response (JSON and every
   SSE chunk) to the expert's name, and adds the header ``x-channelmerge-expert: <name>``;

and it answers ``GET /v1/models`` (and ``/v1/models/{name}``) with one entry per expert,
plus ``auto`` when a router is installed.

Where the expert names (and the router, ``router/`` beside them) come from, first match wins: :func:`configure` (called by the
plugin's config hook when the server process builds its vLLM config, and by tests), the
``CHANNELMERGE_MODEL_DIR`` environment variable (set by ``channelmerge serve``), or the
``--model`` argument of the server's command line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional

from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "CHANNELMERGE_MODEL_DIR"
EXPERT_XARG = "expert"
EXPERT_HEADER = b"x-channelmerge-expert"  # response header: the expert that answered
SALT_PREFIX = "channelmerge-expert:"

# Endpoints whose body is a generation request (model + vllm_xargs + cache_salt).
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
# Other endpoints that carry a `model` field but no sampling (name check only).
NAME_ONLY_PATHS = ("/tokenize", "/detokenize")

Router = Callable[[Mapping[str, Any]], str]
"""A router picks an expert for an `auto` request from the request body."""


class UnknownModel(LookupError):
    def __init__(self, name: object, valid: list[str], reason: str = ""):
        self.name = name
        self.valid = valid
        msg = reason or f"The model {name!r} does not exist."
        super().__init__(f"{msg} Valid model names: {', '.join(valid)}")


class _Registry:
    """Expert names and the optional router of this server process."""

    def __init__(self) -> None:
        self.experts: Optional[list[str]] = None
        self.model_dir: Optional[str] = None
        self.router: Optional[Router] = None

    def load(self) -> list[str]:
        if self.experts is None:
            d = os.environ.get(MODEL_DIR_ENV) or _model_from_argv(sys.argv)
            if not d:
                raise RuntimeError(
                    "channelmerge middleware: no expert names known; set "
                    f"{MODEL_DIR_ENV} to the merged checkpoint directory or use `channelmerge serve`"
                )
            experts = experts_from_dir(d)
            router = load_router(d, experts)
            self.experts, self.model_dir = experts, d
            if router is not None and self.router is None:
                self.router = router
        return self.experts


REGISTRY = _Registry()


def configure(experts: list[str], model_dir: Optional[str] = None, router: Optional[Router] = None) -> None:
    """Set the served experts (and the `auto` router, if any) of this process."""
    REGISTRY.experts = fmt.validate_expert_names(list(experts))
    REGISTRY.model_dir = model_dir
    if router is not None:
        REGISTRY.router = router


def set_router(router: Optional[Router]) -> None:
    """Install the `auto` router: a function from the request body to an expert name."""
    REGISTRY.router = router


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


def experts_from_dir(model_dir: str | os.PathLike) -> list[str]:
    cfg_path = Path(model_dir) / fmt.CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fmt.FormatError(f"{cfg_path}: cannot read ({e})") from None
    return fmt.read_quant_config(cfg, str(cfg_path)).experts


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


def served_names() -> list[str]:
    names = list(REGISTRY.load())
    if REGISTRY.router is not None:
        names.append(fmt.AUTO_MODEL_NAME)
    return names


def resolve_model(name: object, body: Mapping[str, Any]) -> str:
    """The expert that serves a request whose OpenAI `model` field is `name`.

    A missing `model` means the first expert (vLLM's own default-model rule). `auto` asks the
    router installed with :func:`set_router`; without one it is unknown.
    """
    experts = REGISTRY.load()
    if name is None:
        return experts[0]
    if name == fmt.AUTO_MODEL_NAME:
        if REGISTRY.router is None:
            raise UnknownModel(name, served_names(),
                               "The model 'auto' needs a router, and this checkpoint has none.")
        picked = REGISTRY.router(body)
        if picked not in experts:
            raise UnknownModel(picked, served_names(), f"The router picked unknown expert {picked!r}.")
        return picked
    if isinstance(name, str) and name in experts:
        return name
    raise UnknownModel(name, served_names())


def expert_salt(expert: str, client_salt: object = None) -> str:
    """Per-expert prefix-cache salt; a client's own salt stays part of it."""
    s = SALT_PREFIX + expert
    if client_salt:
        s += ":" + str(client_salt)
    return s


def rewrite_request(body: dict[str, Any], expert: str, generation: bool) -> dict[str, Any]:
    body = dict(body)
    body.pop("model", None)
    if generation:
        xargs = body.get("vllm_xargs")
        xargs = dict(xargs) if isinstance(xargs, Mapping) else {}
        xargs[EXPERT_XARG] = expert
        body["vllm_xargs"] = xargs
        body["cache_salt"] = expert_salt(expert, body.get("cache_salt"))
    return body


def error_body(message: str, code: int = 404, param: str = "model",
               type_: str = "invalid_request_error", err_code: str = "model_not_found") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": err_code}}).encode()


def models_body(names: list[str]) -> bytes:
    now = int(time.time())
    return json.dumps({"object": "list", "data": [_model_card(n, now) for n in names]}).encode()


def _model_card(name: str, now: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": now, "owned_by": "channelmerge",
            "root": REGISTRY.model_dir or name, "parent": None}


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
            # Top level (completions, chat, messages) or nested (responses API events).
            for holder in (obj, obj.get("response")):
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
    """ASGI middleware: OpenAI `model` name -> expert (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], **_: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("channelmerge.routed"):
            return await self.app(scope, receive, send)  # not HTTP, or installed twice
        scope = {**scope, "channelmerge.routed": True}
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
            return await self._models(path, send)
        generation = path in GENERATION_PATHS
        if method != "POST" or not (generation or path in NAME_ONLY_PATHS):
            return await self.app(scope, receive, send)

        raw, more_messages = await _read_body(receive)
        try:
            body = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):  # let vLLM produce its own validation error
            return await self.app(scope, _replay(raw, receive), send)
        try:
            expert = resolve_model(body.get("model"), body)
        except UnknownModel as e:
            return await _respond(send, 404, error_body(str(e)))
        new_raw = json.dumps(rewrite_request(body, expert, generation)).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_raw)).encode()))
        scope = {**scope, "headers": headers}
        await self.app(scope, _replay(new_raw, receive), _ResponseRewriter(send, expert))

    async def _models(self, path: str, send: Send) -> None:
        names = served_names()
        if path == "/v1/models":
            return await _respond(send, 200, models_body(names))
        name = path[len("/v1/models/"):]
        if name not in names:
            return await _respond(send, 404, error_body(str(UnknownModel(name, names))))
        return await _respond(send, 200, json.dumps(_model_card(name, int(time.time()))).encode())


async def _read_body(receive: Receive) -> tuple[bytes, list]:
    chunks = []
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            break
        chunks.append(m.get("body", b""))
        if not m.get("more_body", False):
            break
    return b"".join(chunks), []


def _replay(raw: bytes, receive: Receive) -> Receive:
    sent = False

    async def _receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # later: disconnect notifications from the real client

    return _receive
