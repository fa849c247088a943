"""A broken checkpoint fails when vLLM loads it, with a message naming what is wrong.

Every broken copy is made first, then one script process tries to load each in turn (vLLM
imported once), and each test reads its own checkpoint's error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import _json_run, needs_vllm

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


def _copy(merged: Path, dst: Path) -> Path:
    shutil.copytree(merged, dst)
    return dst


def _edit_tensors(d: Path, fn) -> None:
    """Rewrite every shard through `fn(state_dict)`, keeping its safetensors metadata (the
    expert binding) so that only the edit is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    idx = json.loads((d / "model.safetensors.index.json").read_text()) if (d / "model.safetensors.index.json").exists() else None
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        sd = load_file(str(f))
        new = fn(dict(sd))
        save_file(new, str(f), metadata=meta)
        if idx is not None:
            idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k in new or v != f.name}
    if idx is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))


VICTIMS = {"missing": "model.layers.1.self_attn.k_proj.weight",
           "shape": "model.layers.0.mlp.down_proj.group_index",
           "int": "model.layers.0.mlp.up_proj.weight"}


def _config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def _wrong_format_version(d: Path) -> None:
    _config(d, lambda q: q.__setitem__("format_version", 99))


def _missing_tensor(d: Path) -> None:
    _edit_tensors(d, lambda sd: {k: v for k, v in sd.items() if k != VICTIMS["missing"]})


def _wrong_shape(d: Path) -> None:
    def cut(sd):
        sd[VICTIMS["shape"]] = sd[VICTIMS["shape"]][:, :-1].contiguous()
        return sd

    _edit_tensors(d, cut)


def _integer_weights(d: Path) -> None:
    import torch

    def to_int(sd):
        sd[VICTIMS["int"]] = sd[VICTIMS["int"]].round().to(torch.int32)
        return sd

    _edit_tensors(d, to_int)


def _reordered_experts(d: Path) -> None:
    _config(d, lambda q: q.__setitem__("experts", list(reversed(q["experts"]))))


BREAK = {"format_version": _wrong_format_version, "missing": _missing_tensor, "shape": _wrong_shape,
         "int": _integer_weights, "reordered": _reordered_experts}


@pytest.fixture(scope="module")
def load_errors(merged_family, vllm_env, tmp_path_factory) -> dict:
    """{case: the error text of loading that broken copy (None if it loaded)}."""
    root = tmp_path_factory.mktemp("broken")
    pairs = []
    for name, fn in BREAK.items():
        d = _copy(merged_family["merged"], root / name)
        fn(d)
        pairs.append(f"{name}={d}")
    out = root / "errors.json"
    return _json_run(["loads", str(out), *pairs], out, vllm_env)


def _fails(load_errors: dict, case: str) -> str:
    err = load_errors[case]
    assert err is not None, f"a broken checkpoint ({case}) loaded"
    return err


def test_wrong_format_version(load_errors):
    assert "format_version is 99" in _fails(load_errors, "format_version")


def test_missing_tensor(load_errors):
    assert f"'{VICTIMS['missing']}' is missing" in _fails(load_errors, "missing")


def test_wrong_shape(load_errors):
    err = _fails(load_errors, "shape")
    assert VICTIMS["shape"] in err and "shape" in err


def test_integer_weights_are_refused(load_errors):
    """vLLM's loaders would cast an int32 weight into the float parameter without a word."""
    err = _fails(load_errors, "int")
    assert VICTIMS["int"] in err and "floating point" in err


def test_reordered_experts_are_refused(load_errors, merged_family):
    """The expert names are bound to the group_index rows inside the shards: a config whose
    expert list was reordered would otherwise swap experts silently."""
    order = json.loads((merged_family["merged"] / "config.json").read_text())["quantization_config"]["experts"]
    err = _fails(load_errors, "reordered")
    assert str(order) in err and str(list(reversed(order))) in err and "reordered" in err
