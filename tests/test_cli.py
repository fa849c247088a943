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


def test_serve_execs_the_plugin_launcher_with_all_args(monkeypatch):
    """`channelmerge serve` replaces itself by `python -m vllm_channelmerge.serve DIR ARGS...`:
    every argument goes through, and the merge tool never imports the runtime package."""
    import os

    seen = {}

    def fake_execv(path, argv):
        seen["argv"] = argv
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        main(["serve", "some/dir", "--port", "8001", "--max-model-len", "512"])
    assert seen["argv"][1:] == ["-m", "vllm_channelmerge.serve", "some/dir", "--port", "8001",
                                "--max-model-len", "512"]


def test_merge_tool_imports_only_the_format_from_the_plugin():
    """The offline tool needs no runtime: of the plugin package it imports the checkpoint
    format (with the architecture table it is built from, and the v2 row-table checks) and the
    router's file format."""
    import subprocess

    code = ("import sys, merge_tool.cli, merge_tool.merge, merge_tool.extract, merge_tool.inspect, "
            "merge_tool.router_train; print(sorted(m for m in sys.modules if m.startswith('vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['vllm_channelmerge', 'vllm_channelmerge.architectures', "
                           "'vllm_channelmerge.format', 'vllm_channelmerge.router', 'vllm_channelmerge.rowtable']")


def test_usage_errors():
    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["merge"])
