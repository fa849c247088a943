"""The `channelmerge` command line end to end on a tiny synthetic family."""

from __future__ import annotations

import json
import sys
import types

import pytest

from merge_tool.cli import main


def test_make_synthetic_merge_inspect_extract(tmp_path, capsys):
    root = tmp_path / "syn"
    assert main(["make-synthetic", str(root), "--experts", "math", "code", "--arch", "mistral"]) == 0
    assert (root / "merge.yaml").exists() and (root / "math" / "config.json").exists()
    out = tmp_path / "merged"
    assert main(["merge", str(root / "merge.yaml"), str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "2 experts, K=2" in printed and "of the ensemble" in printed
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts"] == ["math", "code"] and info["base_architecture"] == "MistralForCausalLM"
    assert main(["inspect", str(out)]) == 0
    assert "outside group 0" in capsys.readouterr().out
    assert main(["extract", str(out), "code", str(tmp_path / "code")]) == 0
    assert (tmp_path / "code" / "model.safetensors.index.json").exists()
    # user errors: one line, exit status 2, no traceback
    assert main(["merge", str(root / "merge.yaml"), str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("channelmerge: error: ") and "already exists" in err
    assert main(["extract", str(out), "nobody", str(tmp_path / "x")]) == 2
    assert "valid names: math, code" in capsys.readouterr().err
    (root / "bad.yaml").write_text("base_model: base\nexperts: [{name: a, model: math}]\nnum_groups: 2\n")
    assert main(["merge", str(root / "bad.yaml"), str(tmp_path / "y")]) == 2
    assert "num_groups is 2; it must be between 1 and the number of experts (1)" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_serve_dispatches_all_args(monkeypatch):
    seen = {}
    fake = types.ModuleType("vllm_channelmerge.serve")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "vllm_channelmerge.serve", fake)
    import vllm_channelmerge
    monkeypatch.setattr(vllm_channelmerge, "serve", fake, raising=False)
    assert main(["serve", "some/dir", "--port", "8001", "--max-model-len", "512"]) == 0
    assert seen["argv"] == ["some/dir", "--port", "8001", "--max-model-len", "512"]


def test_usage_errors():
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["merge"])
