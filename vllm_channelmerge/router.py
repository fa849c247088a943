"""The `auto` model name's router: a text classifier that picks an expert from a prompt.

The router's file format and its inference, free of vLLM and of scikit-learn: training
(``merge_tool/router_train.py``, scikit-learn: TF-IDF over character n-grams within word
boundaries and over word n-grams, then a logistic regression) stores the fitted pipeline as
plain data inside the merged checkpoint under ``router/`` (``format.ROUTER_DIR``), never as
a pickle, and serving reads it with numpy and safetensors only:

    router/router.json          format, version, experts (class order), feature settings
    router/vocab.json           per feature block, the n-gram terms in column order
    router/weights.safetensors  idf_<i> per feature block, coef [C, F], intercept [C] (float64)

``Router.predict`` re-implements the vectorisers' analysers, sublinear TF, IDF and L2
normalisation and the linear decision exactly, so it gives the sklearn pipeline's
predictions.

    router = train_router({"arith": [...prompts], "code": [...]})     # merge_tool.router_train
    save_router(router, merged_dir / "router")                          # merge_tool.router_train
    Router.load(merged_dir / "router").predict(["What is 2 + 2?"])  # -> ["arith"]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .format import ROUTER_DIR, FormatError, validate_expert_names

ROUTER_FORMAT = "channelmerge-router"
ROUTER_VERSION = 1
ROUTER_CONFIG_FILE = "router.json"
ROUTER_VOCAB_FILE = "vocab.json"
ROUTER_WEIGHTS_FILE = "weights.safetensors"
ROUTER_FILES = (ROUTER_CONFIG_FILE, ROUTER_VOCAB_FILE, ROUTER_WEIGHTS_FILE)

SUPPORTED_ANALYZERS = ("char_wb", "char", "word")  # the sklearn analysers Router reproduces
_WORD_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern
_WHITE_SPACES = re.compile(r"\s\s+")


class RouterError(FormatError):
    """A bad router directory or request; the message names the file, field or expert."""


class RequestTextError(RouterError):
    """A request body the router cannot read (the server answers 400 naming ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# The router reads at most this many characters of a request's text (its first ones): the
# cost of routing grows linearly with the text, and a 3 MB prompt would otherwise take seconds.
ROUTER_MAX_CHARS = 4096
# Content-part types whose `text` the router reads (OpenAI chat / Anthropic, responses API).
_TEXT_PART_TYPES = ("text", "input_text")


# --------------------------------------------------------------------------- analysers

def _word_ngrams(text: str, lo: int, hi: int) -> list[str]:
    tokens = _WORD_TOKEN_RE.findall(text.lower())
    if hi == 1:
        return tokens
    out = list(tokens) if lo == 1 else []
    n_tok = len(tokens)
    for n in range(max(lo, 2), min(hi, n_tok) + 1):
        for i in range(n_tok - n + 1):
            out.append(" ".join(tokens[i:i + n]))
    return out


def _char_wb_ngrams(text: str, lo: int, hi: int) -> list[str]:
    text = _WHITE_SPACES.sub(" ", text.lower())
    out: list[str] = []
    for w in text.split():
        w = " " + w + " "
        w_len = len(w)
        for n in range(lo, hi + 1):
            offset = 0
            out.append(w[offset:offset + n])
            while offset + n < w_len:
                offset += 1
                out.append(w[offset:offset + n])
            if offset == 0:  # a short word is counted once
                break
    return out


def _char_ngrams(text: str, lo: int, hi: int) -> list[str]:
    text = _WHITE_SPACES.sub(" ", text.lower())
    n_chars = len(text)
    out: list[str] = []
    for n in range(lo, min(hi + 1, n_chars + 1)):
        for i in range(n_chars - n + 1):
            out.append(text[i:i + n])
    return out


_ANALYSERS = {"word": _word_ngrams, "char_wb": _char_wb_ngrams, "char": _char_ngrams}


# --------------------------------------------------------------------------- the router

@dataclass
class _Block:
    analyzer: str
    ngram_range: tuple[int, int]
    vocab: dict[str, int]
    idf: np.ndarray  # [V] float64

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Sparse TF-IDF row of one text: (column indices, values), L2-normalised."""
        lo, hi = self.ngram_range
        counts = Counter(g for g in _ANALYSERS[self.analyzer](text, lo, hi) if g in self.vocab)
        idx = np.fromiter((self.vocab[g] for g in counts), dtype=np.int64, count=len(counts))
        val = np.fromiter((1.0 + math.log(c) for c in counts.values()), dtype=np.float64, count=len(counts))
        val *= self.idf[idx]  # sublinear_tf, then idf
        n = math.sqrt(float(val @ val))
        if n > 0.0:
            val /= n
        return idx, val

    def transform(self, texts: list[str]) -> np.ndarray:
        X = np.zeros((len(texts), len(self.vocab)), dtype=np.float64)
        for r, t in enumerate(texts):
            idx, val = self.row(t)
            X[r, idx] = val
        return X


@dataclass
class Router:
    """Picks an expert name for each prompt (numpy only)."""

    experts: list[str]
    blocks: list[_Block] = field(default_factory=list)
    coef: np.ndarray | None = None  # [C, F] (C = 1 for two experts, as in sklearn)
    intercept: np.ndarray | None = None  # [C]

    # ------------------------------------------------------------------ predict
    def features(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([b.transform(texts) for b in self.blocks], axis=1)

    def decision_function(self, texts: list[str]) -> np.ndarray:
        """Linear scores ``[len(texts), C]`` (sparse rows: no dense feature matrix)."""
        out = np.empty((len(texts), self.coef.shape[0]), dtype=np.float64)
        for r, t in enumerate(texts):
            acc = self.intercept.copy()
            off = 0
            for b in self.blocks:
                idx, val = b.row(t)
                acc += self.coef[:, off + idx] @ val
                off += len(b.vocab)
            out[r] = acc
        return out

    def predict(self, texts: list[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("Router.predict takes a list of strings")
        texts = list(texts)
        if not texts:
            return []
        if len(self.experts) == 1:
            return [self.experts[0]] * len(texts)
        scores = self.decision_function(texts)
        if scores.shape[1] == 1:  # binary: sklearn's positive class is experts[1]
            idx = (scores[:, 0] > 0).astype(int)
        else:
            idx = scores.argmax(axis=1)
        return [self.experts[i] for i in idx]

    def route_request(self, body: Mapping[str, Any]) -> str:
        """The expert for one OpenAI request body: the last user message of a chat request,
        else the ``prompt`` of a completion request (first one of a list), else the
        ``input`` of a responses request; at most :data:`ROUTER_MAX_CHARS` characters of it.
        A malformed body raises :class:`RequestTextError`."""
        return self.predict([request_text(body)])[0]

    __call__ = route_request  # a Router is a `serving.Router` (request body -> expert name)

    def check_experts(self, known: Iterable[str], where: str = "checkpoint") -> None:
        """Raise if the router can pick an expert that ``known`` does not contain."""
        known = list(known)
        for e in self.experts:
            if e not in known:
                raise RouterError(f"{ROUTER_DIR}/{ROUTER_CONFIG_FILE}: field 'experts': router expert "
                                  f"{e!r} is not an expert of the {where} ({', '.join(known)})")

    # ------------------------------------------------------------------ files
    def write_files(self, directory: str | os.PathLike) -> None:
        """The router's files into an existing (empty) folder; no publishing (see ``save``)."""
        from safetensors.numpy import save_file

        tmp = Path(directory)
        cfg = {
            "format": ROUTER_FORMAT, "version": ROUTER_VERSION, "experts": list(self.experts),
            "features": [{"analyzer": b.analyzer, "ngram_range": list(b.ngram_range), "lowercase": True,
                          "sublinear_tf": True, "norm": "l2", "size": len(b.vocab)} for b in self.blocks],
        }
        (tmp / ROUTER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        vocab = [sorted(b.vocab, key=b.vocab.__getitem__) for b in self.blocks]
        (tmp / ROUTER_VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        tensors = {f"idf_{i}": np.ascontiguousarray(b.idf, dtype=np.float64) for i, b in enumerate(self.blocks)}
        if self.coef is not None:
            tensors["coef"] = np.ascontiguousarray(self.coef, dtype=np.float64)
            tensors["intercept"] = np.ascontiguousarray(self.intercept, dtype=np.float64)
        save_file(tensors, str(tmp / ROUTER_WEIGHTS_FILE), metadata={"format": ROUTER_FORMAT})

    @classmethod
    def load(cls, directory: str | os.PathLike, experts: Iterable[str] | None = None) -> "Router":
        """Read a router directory; with ``experts``, also check that it only picks those."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        d = Path(directory)
        if not d.is_dir():
            raise RouterError(f"{d}: router directory not found")
        for name in ROUTER_FILES:
            if not (d / name).is_file():
                raise RouterError(f"{d / name}: missing router file")
        cfg_path = d / ROUTER_CONFIG_FILE
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RouterError(f"{cfg_path}: not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise RouterError(f"{cfg_path}: expected a JSON object")
        if cfg.get("format") != ROUTER_FORMAT:
            raise RouterError(f"{cfg_path}: field 'format' is {cfg.get('format')!r}, expected {ROUTER_FORMAT!r}")
        if cfg.get("version") != ROUTER_VERSION:
            raise RouterError(f"{cfg_path}: field 'version' is {cfg.get('version')!r}, "
                              f"this code reads version {ROUTER_VERSION}")
        names = cfg.get("experts")
        if not isinstance(names, list):
            raise RouterError(f"{cfg_path}: field 'experts' must be a list of expert names")
        try:
            validate_expert_names(names, where=f"{cfg_path}: field 'experts'")
        except FormatError as e:
            raise RouterError(str(e)) from None
        feats = cfg.get("features")
        if not isinstance(feats, list):
            raise RouterError(f"{cfg_path}: field 'features' must be a list")

        vocab_path = d / ROUTER_VOCAB_FILE
        try:
            vocabs = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RouterError(f"{vocab_path}: not valid JSON: {e}") from None
        if not isinstance(vocabs, list) or len(vocabs) != len(feats):
            raise RouterError(f"{vocab_path}: expected a list of {len(feats)} term lists (one per feature block)")
        w_path = d / ROUTER_WEIGHTS_FILE
        try:
            w = load_file(str(w_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise RouterError(f"{w_path}: cannot read safetensors: {e}") from None

        blocks: list[_Block] = []
        total = 0
        for i, (f, terms) in enumerate(zip(feats, vocabs)):
            where = f"{cfg_path}: field 'features[{i}]'"
            if not isinstance(f, dict) or f.get("analyzer") not in SUPPORTED_ANALYZERS:
                raise RouterError(f"{where}.analyzer must be one of {SUPPORTED_ANALYZERS}")
            ng = f.get("ngram_range")
            if not (isinstance(ng, list) and len(ng) == 2 and all(isinstance(x, int) for x in ng)
                    and 1 <= ng[0] <= ng[1]):
                raise RouterError(f"{where}.ngram_range must be [min_n, max_n] with 1 <= min_n <= max_n")
            for key, want in (("lowercase", True), ("sublinear_tf", True), ("norm", "l2")):
                if f.get(key, want) != want:
                    raise RouterError(f"{where}.{key} must be {want!r} (the only setting this code reads)")
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise RouterError(f"{vocab_path}: entry {i} must be a list of strings")
            if len(set(terms)) != len(terms):
                raise RouterError(f"{vocab_path}: entry {i} has duplicate terms")
            idf = w.get(f"idf_{i}")
            if idf is None:
                raise RouterError(f"{w_path}: missing tensor 'idf_{i}'")
            if idf.shape != (len(terms),):
                raise RouterError(f"{w_path}: tensor 'idf_{i}' has shape {list(idf.shape)}, "
                                  f"expected [{len(terms)}] (the terms of {ROUTER_VOCAB_FILE} entry {i})")
            blocks.append(_Block(f["analyzer"], (ng[0], ng[1]), {t: j for j, t in enumerate(terms)},
                                 idf.astype(np.float64)))
            total += len(terms)

        coef = intercept = None
        if len(names) > 1:
            n_cls = 1 if len(names) == 2 else len(names)
            for key in ("coef", "intercept"):
                if key not in w:
                    raise RouterError(f"{w_path}: missing tensor {key!r}")
            coef, intercept = w["coef"].astype(np.float64), w["intercept"].astype(np.float64)
            if coef.shape != (n_cls, total):
                raise RouterError(f"{w_path}: tensor 'coef' has shape {list(coef.shape)}, expected "
                                  f"[{n_cls}, {total}] ({len(names)} experts, {total} features)")
            if intercept.shape != (n_cls,):
                raise RouterError(f"{w_path}: tensor 'intercept' has shape {list(intercept.shape)}, "
                                  f"expected [{n_cls}]")
            for key, arr in (("coef", coef), ("intercept", intercept)):
                if not np.isfinite(arr).all():
                    raise RouterError(f"{w_path}: tensor {key!r} holds NaN or Inf")
        for i, b in enumerate(blocks):
            if not np.isfinite(b.idf).all():
                raise RouterError(f"{w_path}: tensor 'idf_{i}' holds NaN or Inf")
        r = cls(list(names), blocks, coef, intercept)
        if experts is not None:
            r.check_experts(experts)
        return r


# --------------------------------------------------------------------------- helpers

def _content_text(content: Any, where: str, max_chars: int | None) -> str:
    """The text of one message's ``content``: a string, or the text parts of a list of parts
    (OpenAI ``text``, responses ``input_text``, Anthropic ``text`` blocks); images and other
    parts are skipped. Anything else is a malformed request (:class:`RequestTextError`)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise RequestTextError(f"{where} must be a string or a list of content parts, "
                               f"got {type(content).__name__}", where)
    parts: list[str] = []
    n = 0
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise RequestTextError(f"{where}[{j}] must be an object (a content part), "
                                   f"got {type(part).__name__}", f"{where}[{j}]")
        if part.get("type") in _TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestTextError(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
            parts.append(text)
            n += len(text) + 1
            if max_chars is not None and n >= max_chars:
                break  # enough text: the rest is never read
    return " ".join(parts)


def last_user_message(messages: list[Mapping[str, Any]], where: str = "messages",
                      max_chars: int | None = None) -> str:
    """The text the router sees for a chat request: the last user message ("" if none).

    Only the messages read (from the end back to the last user message) are checked; a
    malformed one raises :class:`RequestTextError` naming it (``messages[2].content``).
    """
    if not isinstance(messages, list):
        raise RequestTextError(f"{where} must be a list of messages, got {type(messages).__name__}", where)
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if not isinstance(m, Mapping):
            raise RequestTextError(f"{where}[{i}] must be an object (a message with 'role' and "
                                   f"'content'), got {type(m).__name__}", f"{where}[{i}]")
        if m.get("role") == "user":
            return _content_text(m.get("content"), f"{where}[{i}].content", max_chars)
    return ""


def request_text(body: Mapping[str, Any], max_chars: int | None = ROUTER_MAX_CHARS) -> str:
    """The text a router reads from an OpenAI request body (chat, completions or responses),
    cut to its first ``max_chars`` characters (:data:`ROUTER_MAX_CHARS`: the router's cost
    grows with the text, and the first few thousand characters say what the task is).

    Raises :class:`RequestTextError` (a 400 for the server, naming the field) for a body the
    router cannot read: ``messages`` not a list of message objects, a content that is not
    text or parts, a ``prompt`` of token ids. A body without any text gives "".
    """
    text = _request_text(body, max_chars)
    return text if max_chars is None else text[:max_chars]


def _request_text(body: Mapping[str, Any], max_chars: int | None) -> str:
    msgs = body.get("messages")
    if msgs is not None:
        return last_user_message(msgs, "messages", max_chars)
    prompt = body.get("prompt")
    if prompt is not None:
        where = "prompt"
        if isinstance(prompt, list):
            if not prompt:
                raise RequestTextError("prompt is an empty list", "prompt")
            prompt, where = prompt[0], "prompt[0]"
        if not isinstance(prompt, str):
            raise RequestTextError(f"{where} must be text for model 'auto' (the router reads text; "
                                   f"got {type(prompt).__name__}, e.g. token ids)", where)
        return prompt
    inp = body.get("input")
    if inp is None or isinstance(inp, str):
        return inp or ""
    if not isinstance(inp, list):
        raise RequestTextError(f"input must be a string or a list of items, got {type(inp).__name__}", "input")
    for i, item in enumerate(inp):
        if not isinstance(item, Mapping):
            raise RequestTextError(f"input[{i}] must be an object, got {type(item).__name__}", f"input[{i}]")
    # Items without a role (tool outputs, reasoning) are not messages: skipped.
    return last_user_message([m for m in inp if "role" in m], "input", max_chars)


def router_dir(merged_dir: str | os.PathLike) -> Path:
    return Path(merged_dir) / ROUTER_DIR


def router_dir_problem(d: Path) -> str | None:
    """None if ``d`` is a router folder channelmerge saved (what ``save`` and ``router train
    --force`` may replace); else what it is."""
    try:
        cfg = json.loads((Path(d) / ROUTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict) or cfg.get("format") != ROUTER_FORMAT:
        return f"is not a channelmerge router (no {ROUTER_CONFIG_FILE} with format {ROUTER_FORMAT!r})"
    extra = sorted(n for n in os.listdir(d) if n not in ROUTER_FILES)
    if extra:
        return f"is a channelmerge router but also holds {extra[0]!r}, which channelmerge did not write"
    return None
