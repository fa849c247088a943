"""Training the `auto` router (offline, scikit-learn): example prompts per expert in, a
:class:`~vllm_channelmerge.router.Router` out, saved into a merged checkpoint's ``router/``.

The fitted pipeline (TF-IDF over character n-grams within word boundaries and over word
n-grams, then a logistic regression) is converted to the router's plain-data format, which
serving reads with numpy only. Published like every channelmerge output: written beside the
target and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from merge_tool.io import staged_dir
from vllm_channelmerge.format import FormatError, validate_expert_names
from vllm_channelmerge.router import (SUPPORTED_ANALYZERS, RequestTextError, Router, RouterError, _Block,
                                      last_user_message, router_dir_problem)

# Default feature blocks (sklearn TfidfVectorizer keyword arguments we reproduce).
DEFAULT_FEATURES: tuple[dict[str, Any], ...] = (
    {"analyzer": "char_wb", "ngram_range": [2, 4], "max_features": 20000},
    {"analyzer": "word", "ngram_range": [1, 2], "max_features": 20000},
)
_SUPPORTED_ANALYZERS = ("char_wb", "char", "word")


def build_sklearn_pipeline(features: Iterable[Mapping[str, Any]] = DEFAULT_FEATURES, C: float = 10.0,
                           seed: int = 0):
    """The scikit-learn pipeline a Router reproduces (for training and cross-checks)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    vecs = []
    for i, f in enumerate(features):
        if f["analyzer"] not in SUPPORTED_ANALYZERS:
            raise ValueError(f"features[{i}]: analyzer must be one of {SUPPORTED_ANALYZERS}")
        vecs.append((f"f{i}", TfidfVectorizer(analyzer=f["analyzer"], ngram_range=tuple(f["ngram_range"]),
                                              max_features=f.get("max_features"), lowercase=True,
                                              sublinear_tf=True, norm="l2", use_idf=True,
                                              smooth_idf=True, dtype=np.float64)))
    return Pipeline([("features", FeatureUnion(vecs)),
                     ("clf", LogisticRegression(C=C, max_iter=2000, random_state=seed))])


def train_router(examples: Mapping[str, list[str]], features: Iterable[Mapping[str, Any]] = DEFAULT_FEATURES,
                 C: float = 10.0, seed: int = 0, return_pipeline: bool = False):
    """Fit the router on example prompts per expert: ``{expert: [prompt, ...]}``.

    Returns a :class:`~vllm_channelmerge.router.Router` (and the fitted sklearn pipeline with ``return_pipeline``).
    """
    if not isinstance(examples, Mapping) or not examples:
        raise RouterError("examples: give at least one expert with example prompts")
    names = list(examples)
    try:
        validate_expert_names(names, where="examples")
    except FormatError as e:
        raise RouterError(str(e)) from None
    texts: list[str] = []
    labels: list[str] = []
    for n in names:
        prompts = examples[n]
        if isinstance(prompts, str) or not prompts:
            raise RouterError(f"examples[{n!r}]: give a non-empty list of prompts")
        for p in prompts:
            if not isinstance(p, str):
                raise RouterError(f"examples[{n!r}]: prompts must be strings, got {type(p).__name__}")
        texts.extend(prompts)
        labels.extend([n] * len(prompts))
    features = [dict(f) for f in features]
    pipe = build_sklearn_pipeline(features, C=C, seed=seed)
    union = pipe.named_steps["features"]
    if len(names) > 1:
        pipe.fit(texts, labels)
    else:  # one expert: nothing to classify, the features are fitted for completeness
        union.fit(texts)
    blocks: list[_Block] = []
    for (_, vec), f in zip(union.transformer_list, features):
        vocab = {t: int(j) for t, j in vec.vocabulary_.items()}
        blocks.append(_Block(f["analyzer"], tuple(f["ngram_range"]), vocab, np.asarray(vec.idf_, np.float64)))
    if len(names) == 1:
        router = Router(names, blocks, None, None)
        return (router, pipe) if return_pipeline else router
    clf = pipe.named_steps["clf"]
    # sklearn sorts classes; keep that order as the router's class order.
    classes = [str(c) for c in clf.classes_]
    router = Router(classes, blocks, np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64))
    return (router, pipe) if return_pipeline else router


def save_router(router: Router, directory: str | os.PathLike) -> Path:
    """Write router.json, vocab.json and weights.safetensors into ``directory``, atomically.

    An existing ``directory`` is replaced only if it is a router saved before (or empty):
    anything else is refused, and the old router is removed only once the new one is in place.
    """
    d = Path(directory).expanduser().absolute()
    with staged_dir(d, force=True, own=router_dir_problem) as tmp:
        router.write_files(tmp)
    return d


def load_examples_jsonl(path: str | os.PathLike) -> dict[str, list[str]]:
    """Examples file: one JSON object per line, ``{"expert": NAME, "prompt": TEXT}`` or
    ``{"expert": NAME, "messages": [...]}`` (the last user message is used)."""
    out: dict[str, list[str]] = {}
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RouterError(f"{p}:{ln}: not valid JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get("expert"), str):
                raise RouterError(f"{p}:{ln}: field 'expert' (a string) is required")
            if isinstance(row.get("prompt"), str):
                text = row["prompt"]
            elif isinstance(row.get("messages"), list):
                try:
                    text = last_user_message(row["messages"])
                except RequestTextError as e:
                    raise RouterError(f"{p}:{ln}: {e}") from None
            else:
                raise RouterError(f"{p}:{ln}: give field 'prompt' (a string) or 'messages' (a list)")
            out.setdefault(row["expert"], []).append(text)
    if not out:
        raise RouterError(f"{p}: no examples")
    return out
