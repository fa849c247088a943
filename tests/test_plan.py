"""The merge plan: built and validated before any byte is written, and exactly what the merge
then writes; `channelmerge merge --dry-run` prints it and writes nothing."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from merge_tool.cli import main
from merge_tool.merge import plan_merge, run_merge
from merge_tool.plan import format_plan, human_bytes
from vllm_channelmerge import format as fmt

Q = "model.layers.0.self_attn.q_proj.weight"


def tree(root: Path) -> list[tuple[str, int]]:
    """Every entry under `root` (hidden ones too) with its size: what a command left there."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def written(out: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor -> (safetensors dtype, shape), from the written shards' headers."""
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                got[k] = (s.get_dtype(), list(s.get_shape()))
    return got


_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


def test_the_plan_is_what_the_merge_writes(llama_family, tmp_path):
    """Per-tensor K, every output tensor's dtype/shape/shard, the totals: the plan says, the
    merge does (overrides, an exclusion, a stored dtype and several shards, all at once)."""
    cfg = llama_family.merge_config(num_groups_overrides={"model.layers.1.*": 3}, exclude=["*.mlp.down_proj.weight"],
                                    dtype="bfloat16", max_shard_size="300KB", method="ties")
    plan = plan_merge(cfg, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    out = run_merge(cfg, tmp_path / "m", progress=False)

    index = json.loads((out / fmt.INDEX_FILE).read_text())
    assert len(plan.shards) > 1 and index["weight_map"] == plan.weight_map
    assert index["metadata"]["total_size"] == plan.output_bytes
    assert written(out) == {t.name: (_ST[t.dtype], list(t.shape)) for t in plan.outputs}
    report = json.loads((out / fmt.REPORT_FILE).read_text())
    assert report["params"] == {"stored": plan.stored_params, "base": plan.base_params,
                                "ensemble": plan.ensemble_params, "ratio": plan.param_ratio}
    assert list(report["tensors"]) == [j.name for j in plan.jobs]
    ks = {n: t["num_groups"] for n, t in report["tensors"].items() if t["kind"] == "channel"}
    assert ks == {j.name: j.k for j in plan.jobs if j.kind == "channel"}
    assert ks["model.layers.1.self_attn.q_proj.weight"] == 3 and ks["model.layers.0.mlp.down_proj.weight"] == 1
    overrides = fmt.read_checkpoint_config(out).num_groups_overrides
    assert {fmt.module_of(n): k for n, k in ks.items() if k != 2} == overrides


def test_jobs_say_what_happens_to_each_tensor(tmp_path):
    """Frozen embeddings are stored once, layer norms are folded, the final norm is kept per
    expert; a bias travels with its weight; the parameter count is the outputs' minus indices."""
    from merge_tool.synthetic import make_family

    base, dirs = make_family(tmp_path / "src", ["a", "b", "c"], arch="qwen2", tie_word_embeddings=True,
                             frozen=("embed_tokens",))
    d = {"base_model": str(base), "experts": [{"name": n, "model": str(p)} for n, p in dirs.items()],
         "num_groups": 2}
    from merge_tool.config import parse_config

    plan = plan_merge(parse_config(d), tmp_path / "m")
    jobs = {j.name: j for j in plan.jobs}
    emb = "model.embed_tokens.weight"
    assert plan.identical == [emb] and jobs[emb].k == 1
    assert jobs[emb].role == "channel, identical in every expert (stored once)"
    assert jobs["model.layers.0.input_layernorm.weight"].role == "norm folded (stored as ones)"
    assert jobs["model.norm.weight"].role == "norm kept per expert"
    assert [t.name for t in jobs["model.norm.weight"].outputs] == ["model.norm.weight", "model.norm.expert_weight"]
    assert jobs[Q].role == "channel-merged" and jobs[Q].norm == "model.layers.0.input_layernorm.weight"
    assert [(t.name, t.shape) for t in jobs[Q].outputs] == [
        (Q, (2, 128, 128)), ("model.layers.0.self_attn.q_proj.bias", (2, 128)),
        ("model.layers.0.self_attn.q_proj.group_index", (3, 128))]
    assert "model.layers.0.self_attn.q_proj.bias" not in jobs  # part of its weight's channels
    stored = sum(math.prod(t.shape) for t in plan.outputs if not t.name.endswith(fmt.GROUP_INDEX_SUFFIX))
    assert plan.stored_params == stored and plan.param_ratio == stored / (3 * plan.base_params)

    unfolded = plan_merge(parse_config({**d, "fold_norms": False}), tmp_path / "m")
    assert {j.role for j in unfolded.jobs if j.name.endswith("norm.weight")} == {"norm merged across experts"}
    assert "note: norm model.norm.weight merged across experts (fold_norms is false)" in format_plan(unfolded)


def test_dry_run_prints_the_plan_and_writes_nothing(llama_family, tmp_path, capsys):
    y = tmp_path / "cfg" / "merge.yaml"
    y.parent.mkdir()
    y.write_text(yaml.safe_dump(llama_family.config()))
    out = tmp_path / "new" / "deeper" / "merged"  # not even the missing parents are made
    before, inputs = tree(tmp_path), tree(llama_family.root)
    assert main(["merge", str(y), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert tree(tmp_path) == before and tree(llama_family.root) == inputs

    plan = plan_merge(llama_family.merge_config(), out)
    assert text.strip() == format_plan(plan).strip()
    assert f"merge plan into {out} (dry run: nothing was written)" in text
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in text.splitlines()]
    by_kind = {r[0]: r[1:] for r in rows if r[0].startswith(("channel", "norm "))}
    assert by_kind == {"channel-merged": ["16", "2", "3.3 MiB"],  # 7 projections x 2 layers + embeddings + lm_head
                       "norm folded (stored as ones)": ["4", "-", "2.0 KiB"],
                       "norm kept per expert": ["1", "-", "2.5 KiB"]}
    by_layer = {r[0]: r[1:] for r in rows if r[0].startswith(("model.", "lm_head"))}
    assert list(by_layer) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert by_layer["model.layers.1"] == ["9", "2", "1.1 MiB"]
    assert f"{plan.output_bytes:,} bytes ({human_bytes(plan.output_bytes)})" in text
    assert f"parameters stored: {plan.stored_params:,} = 0.500 of the ensemble" in text

    assert main(["-v", "merge", str(y), str(out), "--dry-run"]) == 0  # -v: every output tensor
    verbose = capsys.readouterr().out
    assert f"    {fmt.group_index_name(Q)}  int32 [4, 128]  -> model-00001-of-00001.safetensors" in verbose
    assert tree(tmp_path) == before


def test_dry_run_with_force_leaves_the_previous_merge_alone(llama_family, merged_llama_k2, tmp_path, capsys):
    prev = tmp_path / "prev"
    shutil.copytree(merged_llama_k2, prev)
    y = tmp_path / "merge.yaml"
    y.write_text(yaml.safe_dump(llama_family.config(num_groups=3)))
    before = tree(tmp_path)
    assert main(["merge", str(y), str(prev), "--dry-run", "--force"]) == 0
    assert "K=3" in capsys.readouterr().out and tree(tmp_path) == before


def _bad_cases(fam, mistral, tmp_path: Path) -> dict[str, tuple[dict, Path, list[str]]]:
    """name -> (config, output, extra args): each refused by the merge before it writes."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    alien = fam.config()
    alien["experts"][1]["model"] = str(next(iter(mistral.experts.values())))
    cases = {
        "exists": (fam.config(), taken, []),
        "force on a user's folder": (fam.config(), taken, ["--force"]),
        "output is an input": (fam.config(), fam.base, ["--force"]),
        "fused K split": (fam.config(num_groups_overrides={"*.q_proj.weight": 1}), tmp_path / "o", []),
        "K > N": (fam.config(num_groups=5), tmp_path / "o", []),
        "incompatible expert": (alien, tmp_path / "o", []),
        "missing base": ({**fam.config(), "base_model": str(tmp_path / "nobase")}, tmp_path / "o", []),
        "parent is a file": (fam.config(), tmp_path / "afile" / "o", []),
        "ancestor is a file": (fam.config(), tmp_path / "afile" / "x" / "o", []),
    }
    if not torch.cuda.is_available():
        cases["no GPU"] = (fam.config(), tmp_path / "o", ["--device", "cuda"])
    return cases


def test_dry_run_refuses_what_the_merge_refuses(llama_family, mistral_family, tmp_path, capsys):
    """Same exit status and the same one-line error as the real merge, and nothing left."""
    work = tmp_path / "work"
    work.mkdir()
    for name, (d, out, extra) in _bad_cases(llama_family, mistral_family, work).items():
        y = tmp_path / "merge.yaml"
        y.write_text(yaml.safe_dump(d))
        before = tree(work)
        assert main(["merge", str(y), str(out), "--dry-run", *extra]) == 2, name
        dry = capsys.readouterr()
        assert dry.out == "" and tree(work) == before, name
        assert main(["merge", str(y), str(out), "-q", *extra]) == 2, name
        real = capsys.readouterr().err.strip().splitlines()[-1]
        assert dry.err.strip().splitlines()[-1] == real and real.startswith("channelmerge: error: "), name
        assert tree(work) == before, name
