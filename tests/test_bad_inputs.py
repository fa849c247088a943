"""Every bad input of the issue: one clear error naming the file/tensor/field, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tool.config import ConfigError, parse_config
from merge_tool.io import InputError
from merge_tool.merge import run_merge

Q = "model.layers.0.self_attn.q_proj.weight"


def clone(src: Path, dst: Path, edit: Optional[Callable[[dict], None]] = None,
          config_edit: Optional[Callable[[dict], None]] = None) -> Path:
    """Copy an HF folder, editing its state dict and/or config.json."""
    shutil.copytree(src, dst)
    if edit:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_edit:
        c = json.loads((dst / "config.json").read_text())
        config_edit(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _merge_with_bad_expert(family, tmp_path, bad: Path, **kw):
    d = family.config(**kw)
    d["experts"][1]["model"] = str(bad)
    return run_merge(parse_config(d), tmp_path / "out", progress=False)


def _set(name, fn):
    def edit(sd):
        sd[name] = fn(sd[name])
    return edit


CASES = {
    "shape": (dict(edit=_set(Q, lambda t: torch.cat([t, t[:1]]))), InputError,
              [Q, "shape [129, 128]", "model.safetensors"]),
    "vocab": (dict(config_edit=lambda c: c.update(vocab_size=600)), InputError, ["vocab_size is 600", "config.json"]),
    "architecture": (dict(config_edit=lambda c: c.update(architectures=["MistralForCausalLM"])), InputError,
                     ["architectures is 'MistralForCausalLM'"]),
    "missing tensor": (dict(edit=lambda sd: sd.pop(Q)), InputError, [f"tensor {Q!r} of the base is missing"]),
    "extra tensor": (dict(edit=lambda sd: sd.update({"model.extra.weight": torch.zeros(2)})), InputError,
                     ["'model.extra.weight' is not in the base"]),
    "nan": (dict(edit=_set("model.layers.1.mlp.down_proj.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))),
            InputError, ["'model.layers.1.mlp.down_proj.weight' contains", "NaN/Inf", "model.safetensors"]),
    "inf in a norm": (dict(edit=_set("model.norm.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))),
                      InputError, ["'model.norm.weight'", "NaN/Inf"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_incompatible_expert(llama_family, tmp_path, leftovers, case):
    kw, exc, needles = CASES[case]
    bad = clone(llama_family.experts["code"], tmp_path / "bad", **kw)
    with pytest.raises(exc) as ei:
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert "code" in msg or str(bad) in msg
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["experts"].append(dict(d["experts"][0])), "duplicate expert name 'math'"),
    (lambda d: d["experts"][0].update(name="math/../x"), "invalid expert name"),
    (lambda d: d.update(num_groups=0), "num_groups is 0"),
    (lambda d: d.update(num_groups=5), "num_groups is 5; it must be between 1 and the number of experts (4)"),
    (lambda d: d.update(method="slerp"), "allowed values: average, task_arithmetic, ties, dare"),
])
def test_bad_config(llama_family, mutate, needle):
    d = llama_family.config()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        parse_config(d, "merge.yaml")
    assert needle in str(ei.value)


def test_fused_modules_must_share_k(llama_family, tmp_path, leftovers):
    cfg = llama_family.merge_config(num_groups_overrides={"*.q_proj": 1})
    with pytest.raises(ConfigError, match=r"qkv_proj different K.*q_proj=1.*k_proj=2.*must share K"):
        run_merge(cfg, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="gate_up_proj"):
        run_merge(llama_family.merge_config(exclude=["*.up_proj.weight"]), tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_missing_files(llama_family, tmp_path, leftovers):
    with pytest.raises(InputError, match=r"expert 'code': model folder .*nowhere not found"):
        _merge_with_bad_expert(llama_family, tmp_path, tmp_path / "nowhere")
    bad = clone(llama_family.experts["code"], tmp_path / "noconf")
    (bad / "config.json").unlink()
    with pytest.raises(InputError, match=r"noconf/config.json: file not found"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    bad = clone(llama_family.experts["code"], tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights in"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    # a sharded checkpoint whose index names a shard that is not there
    bad = clone(llama_family.experts["code"], tmp_path / "sharded")
    sd = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(bad / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(bad / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, k in enumerate(names)}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    out = _merge_with_bad_expert(llama_family, tmp_path, bad)  # a sharded input works
    shutil.rmtree(out)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"model-00002-of-00002.safetensors: shard listed in .* is missing"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    assert leftovers(tmp_path, "out") == []


def test_pickle_refused_or_weights_only(llama_family, tmp_path, leftovers, caplog):
    bad = clone(llama_family.experts["code"], tmp_path / "pickled")
    sd = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(sd, str(bad / "pytorch_model.bin"))
    with pytest.raises(InputError, match=r"pytorch_model.bin: pickled PyTorch weights are refused.*weights_only=True"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    assert leftovers(tmp_path, "out") == []
    with caplog.at_level("WARNING"):
        out = _merge_with_bad_expert(llama_family, tmp_path, bad, allow_pickle_weights=True)
    assert (out / "config.json").exists()
    assert "weights_only=True" in caplog.text
    # a pickle that is not plain tensors is refused even then
    shutil.rmtree(out)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, str(bad / "pytorch_model.bin"))
    with pytest.raises(InputError, match="weights_only=True"):
        _merge_with_bad_expert(llama_family, tmp_path, bad, allow_pickle_weights=True)
    assert leftovers(tmp_path, "out") == []


def test_truncated_and_corrupt_safetensors(llama_family, tmp_path, leftovers):
    bad = clone(llama_family.experts["code"], tmp_path / "trunc")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match=r"trunc/model.safetensors: .*(truncated|corrupt)"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(InputError, match=r"trunc/model.safetensors: .*(truncated or corrupt|unreadable)"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    f.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"trunc/model.safetensors"):
        _merge_with_bad_expert(llama_family, tmp_path, bad)
    assert leftovers(tmp_path, "out") == []


def test_bad_base(llama_family, tmp_path, leftovers):
    bad = clone(llama_family.base, tmp_path / "badbase", edit=_set(Q, lambda t: t * float("nan")))
    d = llama_family.config()
    d["base_model"] = str(bad)
    with pytest.raises(InputError, match=rf"badbase/model.safetensors: tensor '{Q}' contains"):
        run_merge(parse_config(d), tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_interrupted_merge_leaves_nothing(llama_family, tmp_path, leftovers, monkeypatch):
    from merge_tool import merge as mm

    calls = {"n": 0}
    real = mm._Merger.channel

    def boom(self, job, writer, stats):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, job, writer, stats)

    monkeypatch.setattr(mm._Merger, "channel", boom)
    with pytest.raises(KeyboardInterrupt):
        run_merge(llama_family.merge_config(), tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_output_may_not_overwrite_an_input(llama_family, tmp_path):
    cfg = llama_family.merge_config()
    with pytest.raises(ConfigError, match="would overwrite the input model"):
        run_merge(cfg, llama_family.experts["code"], force=True, progress=False)
    with pytest.raises(ConfigError, match="would overwrite the input model"):
        run_merge(cfg, llama_family.root, force=True, progress=False)
    assert (llama_family.experts["code"] / "model.safetensors").exists()
