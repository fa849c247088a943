"""`channelmerge router train/predict`, and the `auto` router as serving loads it."""

from __future__ import annotations

import json

import pytest

from merge_tool.cli import main
from vllm_channelmerge import format as fmt
from vllm_channelmerge import serving
from merge_tool.router_train import load_examples_jsonl
from vllm_channelmerge.router import Router, router_dir

EXPERTS = ["math", "code", "chat"]
WORDS = {
    "math": ["add", "plus", "sum", "seven", "nine", "number", "total", "minus"],
    "code": ["python", "function", "def", "return", "list", "loop", "variable", "class"],
    "chat": ["hello", "friend", "weather", "today", "feel", "thanks", "nice", "morning"],
}


def examples_rows(n: int = 12) -> list[dict]:
    """Separable synthetic prompts: each expert's own words (also used by the server tests)."""
    rows = []
    for e, words in WORDS.items():
        for i in range(n):
            ws = [words[(i + k) % len(words)] for k in range(4)]
            rows.append({"expert": e, "prompt": "please " + " ".join(ws)})
    rows.append({"expert": "chat", "messages": [{"role": "system", "content": "be nice"},
                                                {"role": "user", "content": "hello friend good morning"}]})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def merged_config_dir(d, experts=EXPERTS):
    d.mkdir(parents=True, exist_ok=True)
    qc = fmt.ChannelMergedConfig(experts=list(experts), num_groups=2).to_dict()
    (d / fmt.CONFIG_FILE).write_text(json.dumps({"architectures": ["ChannelMergedLlamaForCausalLM"],
                                                 "quantization_config": qc}))
    return d


def test_router_train_and_predict(tmp_path, capsys):
    d = merged_config_dir(tmp_path / "m")
    ex = write_jsonl(tmp_path / "ex.jsonl", examples_rows())
    assert main(["router", "train", str(d), ex]) == 0
    out = capsys.readouterr().out
    # The report is what the saved router does on the examples, computed here independently.
    examples = load_examples_jsonl(ex)
    router = Router.load(router_dir(d), EXPERTS)
    right = {e: sum(p == e for p in router.predict(texts)) for e, texts in examples.items()}
    total = sum(len(t) for t in examples.values())
    assert f"{total} examples, training accuracy {sum(right.values()) / total:.3f}" in out
    for e, texts in examples.items():
        assert f"  {e}: {len(texts)} examples, {right[e] / len(texts):.3f} routed back to it" in out
    assert [len(examples[e]) for e in EXPERTS] == [12, 12, 13] and sum(right.values()) / total > 0.9
    assert sorted(p.name for p in router_dir(d).iterdir()) == ["router.json", "vocab.json", "weights.safetensors"]
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert main(["router", "predict", str(d), "please add seven plus nine", "def python function",
                 "hello friend"]) == 0
    assert capsys.readouterr().out.split() == ["math", "code", "chat"]
    # the serving side loads it
    r = serving.load_router(d, EXPERTS)
    assert r.route_request({"messages": [{"role": "user", "content": "python loop"}]}) == "code"
    assert serving.load_router(tmp_path / "nothing", EXPERTS) is None


def test_router_train_errors(tmp_path, capsys):
    d = merged_config_dir(tmp_path / "m")
    rows = examples_rows(3)
    rows.insert(5, {"expert": "poetry", "prompt": "roses are red"})
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["router", "train", str(d), bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("channelmerge: error: ") and f"{bad}:6:" in err and "'poetry'" in err
    assert "math, code, chat" in err and not router_dir(d).exists()

    assert main(["router", "train", str(d), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: examples file not found" in capsys.readouterr().err

    (tmp_path / "broken.jsonl").write_text('{"expert": "math", "prompt": "1+1"}\n{oops\n')
    assert main(["router", "train", str(d), str(tmp_path / "broken.jsonl")]) == 2
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().err

    assert main(["router", "train", str(tmp_path / "nomodel"), bad]) == 2
    assert "config.json" in capsys.readouterr().err

    good = write_jsonl(tmp_path / "ex.jsonl", examples_rows())
    assert main(["router", "train", str(d), good]) == 0
    before = (router_dir(d) / "weights.safetensors").read_bytes()
    assert main(["router", "train", str(d), write_jsonl(tmp_path / "two.jsonl", examples_rows()[:24])]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (router_dir(d) / "weights.safetensors").read_bytes() == before
    assert main(["router", "train", str(d), str(tmp_path / "two.jsonl"), "--force"]) == 0
    assert "no examples for chat" in capsys.readouterr().out
    assert Router.load(router_dir(d)).experts == ["code", "math"]

    assert main(["router", "predict", str(tmp_path / "m2"), "x"]) == 2  # no checkpoint
    capsys.readouterr()
    d3 = merged_config_dir(tmp_path / "m3")
    assert main(["router", "predict", str(d3), "x"]) == 2
    assert "router directory not found" in capsys.readouterr().err


def test_bad_router_fails_at_startup_naming_the_file(tmp_path):
    from vllm_channelmerge import serve

    d = merged_config_dir(tmp_path / "m")
    assert main(["router", "train", str(d), write_jsonl(tmp_path / "ex.jsonl", examples_rows())]) == 0
    serve.build_command(str(d), [], python="py")  # a good router passes
    (router_dir(d) / "vocab.json").write_text("{not json")
    with pytest.raises(fmt.FormatError, match="vocab.json"):
        serve.build_command(str(d), [], python="py")
    with pytest.raises(fmt.FormatError, match="vocab.json"):
        serving.load_router(d, EXPERTS)
    # a router that can pick an expert the checkpoint lacks
    d2 = merged_config_dir(tmp_path / "m2", ["math", "code"])
    assert main(["router", "train", str(d), write_jsonl(tmp_path / "ex.jsonl", examples_rows()), "--force"]) == 0
    import shutil

    shutil.copytree(router_dir(d), router_dir(d2))
    with pytest.raises(fmt.FormatError, match="router.json.*'chat' is not an expert"):
        serving.load_router(d2, ["math", "code"])


def test_registry_fallback_loads_router(tmp_path, monkeypatch):
    d = merged_config_dir(tmp_path / "m")
    assert main(["router", "train", str(d), write_jsonl(tmp_path / "ex.jsonl", examples_rows())]) == 0
    monkeypatch.setenv(serving.MODEL_DIR_ENV, str(d))
    registry = serving.ExpertRegistry()  # a middleware added by --middleware: found on first use
    assert registry.served_names() == EXPERTS + ["auto"]
    assert registry.resolve_model("auto", {"prompt": "sum of nine plus seven"}) == "math"


def test_merge_config_router_section(tmp_path, capsys):
    import yaml

    root = tmp_path / "syn"
    assert main(["make-synthetic", str(root), "--experts", "math", "code", "chat"]) == 0
    cfg = yaml.safe_load((root / "merge.yaml").read_text())
    rows = examples_rows(4)
    write_jsonl(root / "bad.jsonl", rows + [{"expert": "poetry", "prompt": "roses"}])
    (root / "bad.yaml").write_text(yaml.safe_dump({**cfg, "router": {"examples": "bad.jsonl"}}))
    out = tmp_path / "merged"
    assert main(["merge", str(root / "bad.yaml"), str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:14:" in err and "'poetry'" in err and not out.exists()  # refused before merging
    (root / "typo.yaml").write_text(yaml.safe_dump({**cfg, "router": {"example": "x.jsonl"}}))
    assert main(["merge", str(root / "typo.yaml"), str(out), "-q"]) == 2
    assert "router.example: unknown field; allowed fields: examples" in capsys.readouterr().err

    write_jsonl(root / "ex.jsonl", rows)
    (root / "merge.yaml").write_text(yaml.safe_dump({**cfg, "router": {"examples": "ex.jsonl"}}))
    assert main(["merge", str(root / "merge.yaml"), str(out), "-q"]) == 0
    assert f"wrote {router_dir(out)}" in capsys.readouterr().out
    assert Router.load(router_dir(out), EXPERTS).predict(["python def loop"]) == ["code"]
    assert yaml.safe_load((out / "channelmerge.yaml").read_text())["router"]["examples"] == str(root / "ex.jsonl")
    # without the section, the stored config has no `router` key
    (root / "plain.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / "plain.yaml"), str(tmp_path / "plain"), "-q"]) == 0
    assert "router" not in yaml.safe_load((tmp_path / "plain" / "channelmerge.yaml").read_text())
    assert not router_dir(tmp_path / "plain").exists()
