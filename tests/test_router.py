"""The `auto` router: training, pickle-free save/load, sklearn parity, clear errors (CPU, fast)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from vllm_channelmerge.format import ROUTER_DIR  # noqa: E402
from merge_tool.router_train import load_examples_jsonl, save_router, train_router  # noqa: E402
from vllm_channelmerge.router import (  # noqa: E402
    ROUTER_CONFIG_FILE,
    ROUTER_VOCAB_FILE,
    ROUTER_WEIGHTS_FILE,
    Router,
    RouterError,
    last_user_message,
)


def _prompts(kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "math":
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            out.append(rng.choice(["What is {} + {}?", "Compute {} times {}.", "Subtract {} from {}."]).format(a, b))
        elif kind == "code":
            name = rng.choice(["f", "solve", "helper", "parse_line"])
            out.append(rng.choice(["Write a Python function `{}(x)` that returns x squared.",
                                   "Implement `{}(items)` in Python: sort the list.",
                                   "Fix the bug in def {}(s): return s[1:]"]).format(name))
        elif kind == "chat":
            topic = rng.choice(["the weather", "your weekend", "a good book", "Paris", "music"])
            out.append(rng.choice(["Tell me about {}.", "What do you think of {}?",
                                   "Could you chat with me about {}, please?"]).format(topic))
        else:  # chinese
            out.append(rng.choice(["今天天气怎么样？", "请把这句话翻译成中文：good morning", "你好，请介绍一下{}。"])
                       .format(rng.choice(["北京", "长城", "熊猫"])))
    return out


EXPERTS = ("math", "code", "chat", "zh")


@pytest.fixture(scope="module")
def trained():
    examples = {e: _prompts(e, 40, i) for i, e in enumerate(EXPERTS)}
    router, pipe = train_router(examples, return_pipeline=True)
    held_out = [p for i, e in enumerate(EXPERTS) for p in _prompts(e, 15, 100 + i)]
    labels = [e for e in EXPERTS for _ in range(15)]
    return router, pipe, held_out, labels


def test_train_predicts_held_out(trained):
    router, _, texts, labels = trained
    assert sorted(router.experts) == sorted(EXPERTS)
    pred = router.predict(texts)
    acc = np.mean([p == y for p, y in zip(pred, labels)])
    assert acc >= 0.95
    assert router.predict([]) == []
    with pytest.raises(TypeError):
        router.predict("a single string")


def test_same_predictions_and_scores_as_sklearn(trained):
    router, pipe, texts, _ = trained
    odd = ["", "   ", "!!!", "x", "WHAT IS 2+2", "def  f(x):\n\treturn   x", "混合 mixed 文本 12 + 3"]
    texts = texts + odd
    assert router.predict(texts) == [str(p) for p in pipe.predict(texts)]
    X = pipe.named_steps["features"].transform(texts).toarray()
    np.testing.assert_allclose(router.features(texts), X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(router.decision_function(texts), pipe.decision_function(texts),
                               rtol=1e-9, atol=1e-9)


def test_save_load_round_trip_without_pickle(trained, tmp_path):
    router, pipe, texts, _ = trained
    d = save_router(router, tmp_path / ROUTER_DIR)
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted([ROUTER_CONFIG_FILE, ROUTER_VOCAB_FILE, ROUTER_WEIGHTS_FILE])
    for p in d.iterdir():  # nothing pickled: no pickle files, no pickle opcodes
        assert p.suffix not in (".pkl", ".pickle", ".joblib", ".bin")
        assert not p.read_bytes().startswith(b"\x80")
    json.loads((d / ROUTER_CONFIG_FILE).read_text())
    loaded = Router.load(d, experts=list(EXPERTS) + ["other"])
    assert loaded.experts == router.experts
    assert loaded.predict(texts) == router.predict(texts) == [str(p) for p in pipe.predict(texts)]
    # overwriting an existing router directory works and leaves no temp folder
    save_router(router, d)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROUTER_DIR]


def test_two_experts_binary_case(tmp_path):
    examples = {"math": _prompts("math", 30, 1), "code": _prompts("code", 30, 2)}
    router, pipe = train_router(examples, return_pipeline=True)
    assert router.coef.shape[0] == 1
    texts = _prompts("math", 10, 50) + _prompts("code", 10, 51)
    loaded = Router.load(save_router(router, tmp_path / "r"))
    assert loaded.predict(texts) == [str(p) for p in pipe.predict(texts)]
    assert loaded.predict(texts) == ["math"] * 10 + ["code"] * 10


def test_one_expert_always_picks_it(tmp_path):
    loaded = Router.load(save_router(train_router({"only": ["a prompt", "another"]}), tmp_path / "r"))
    assert loaded.predict(["anything", ""]) == ["only", "only"]


def test_training_errors():
    with pytest.raises(RouterError, match="at least one expert"):
        train_router({})
    with pytest.raises(RouterError, match="non-empty list"):
        train_router({"math": []})
    with pytest.raises(RouterError, match="reserved"):
        train_router({"auto": ["x"], "math": ["y"]})
    with pytest.raises(RouterError, match="invalid expert name"):
        train_router({"bad name": ["x"], "math": ["y"]})


def test_unknown_expert_is_named(trained, tmp_path):
    router = trained[0]
    d = save_router(router, tmp_path / ROUTER_DIR)
    with pytest.raises(RouterError, match=r"'zh' is not an expert"):
        Router.load(d, experts=["math", "code", "chat"])


@pytest.mark.parametrize("case", ["missing_dir", "missing_file", "bad_json", "bad_format", "bad_experts",
                                  "vocab_mismatch", "coef_shape", "missing_tensor", "nan", "bad_analyzer"])
def test_bad_router_dir_errors_name_the_file(trained, tmp_path, case):
    from safetensors.numpy import load_file, save_file

    d = save_router(trained[0], tmp_path / ROUTER_DIR)
    cfg_p, voc_p, w_p = d / ROUTER_CONFIG_FILE, d / ROUTER_VOCAB_FILE, d / ROUTER_WEIGHTS_FILE
    cfg = json.loads(cfg_p.read_text())
    w = load_file(str(w_p))
    expect = {"missing_dir": "not found", "missing_file": ROUTER_VOCAB_FILE, "bad_json": ROUTER_CONFIG_FILE,
              "bad_format": "'format'", "bad_experts": "'experts'", "vocab_mismatch": "idf_0",
              "coef_shape": "'coef'", "missing_tensor": "'intercept'", "nan": "NaN",
              "bad_analyzer": "analyzer"}[case]
    target = d
    if case == "missing_dir":
        target = tmp_path / "nowhere"
    elif case == "missing_file":
        voc_p.unlink()
    elif case == "bad_json":
        cfg_p.write_text("{not json")
    elif case == "bad_format":
        cfg["format"] = "sklearn-pickle"
        cfg_p.write_text(json.dumps(cfg))
    elif case == "bad_experts":
        cfg["experts"] = ["math", "math", "code", "chat"]
        cfg_p.write_text(json.dumps(cfg))
    elif case == "vocab_mismatch":
        vocab = json.loads(voc_p.read_text())
        vocab[0] = vocab[0][:-1]
        voc_p.write_text(json.dumps(vocab))
    elif case == "bad_analyzer":
        cfg["features"][0]["analyzer"] = "callable"
        cfg_p.write_text(json.dumps(cfg))
    else:
        if case == "coef_shape":
            w["coef"] = w["coef"][:, :-1].copy()
        elif case == "missing_tensor":
            del w["intercept"]
        elif case == "nan":
            w["coef"][0, 0] = np.nan
        save_file(w, str(w_p))
    with pytest.raises(RouterError, match=expect) as ei:
        Router.load(target)
    if case not in ("missing_dir",):
        assert str(d) in str(ei.value)


def test_route_request_bodies(trained):
    router, pipe = trained[0], trained[1]
    chat = {"model": "auto", "messages": [{"role": "system", "content": "You are helpful."},
                                          {"role": "user", "content": "Tell me about Paris."},
                                          {"role": "assistant", "content": "Paris is..."},
                                          {"role": "user", "content": "What is 12 + 345?"}]}
    assert router.route_request(chat) == "math"
    assert router({"model": "auto", "prompt": ["Write a Python function `f(x)` that returns x squared."]}) == "code"
    assert router({"model": "auto", "input": "今天天气怎么样？"}) == "zh"
    # No text: no feature fires, so the pick is the class with the largest intercept, as
    # sklearn's pipeline picks it for "".
    assert np.count_nonzero(router.features([""])) == 0
    assert router.intercept.shape == (len(EXPERTS),)
    want = router.experts[int(np.argmax(router.intercept))]
    assert router({"model": "auto"}) == want == str(pipe.predict([""])[0])


def test_examples_jsonl_and_last_user_message(tmp_path):
    p = tmp_path / "examples.jsonl"
    rows = [{"expert": "math", "prompt": "What is 1 + 2?"},
            {"expert": "code", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "first"},
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": [{"type": "text", "text": "write f(x)"}]}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_examples_jsonl(p) == {"math": ["What is 1 + 2?"], "code": ["write f(x)"]}
    assert last_user_message([{"role": "assistant", "content": "hi"}]) == ""
    p.write_text('{"prompt": "no expert"}\n')
    with pytest.raises(RouterError, match=r"examples.jsonl:1: field 'expert'"):
        load_examples_jsonl(p)
