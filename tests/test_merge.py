"""The merge itself: K=1 is the classic merge, K=N is exact, format v1 round trip, recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_tool import methods
from merge_tool.config import parse_config
from merge_tool.merge import run_merge
from vllm_channelmerge import format as fmt


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _classic(name: str, base: torch.Tensor, ws: list[torch.Tensor], method: str, p) -> torch.Tensor:
    """Whole-tensor merges written from the papers / mergekit, independent of merge_tool."""
    b = base.float()
    ds = [w.float() - b for w in ws]
    if method == "average":
        return torch.stack([w.float() for w in ws]).mean(0)
    if method == "task_arithmetic":
        return b + p.scale * sum(ds) / (len(ds) if p.normalize else 1)
    if method == "ties":
        trimmed = []
        for d in ds:
            k = int(p.density * d.numel())
            top = torch.argsort(d.abs().reshape(-1), descending=True)[:k]
            t = torch.zeros(d.numel())
            t[top] = d.reshape(-1)[top]
            trimmed.append(t.reshape(d.shape))
        st = torch.stack(trimmed)
        sign = torch.where(st.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(st) == sign).float()
        return b + p.scale * (st * agree).sum(0) / agree.sum(0).clamp_min(1)
    if method == "dare":
        flat = torch.arange(b.numel()).reshape(b.shape)
        out = torch.zeros_like(b)
        for n, d in enumerate(ds):
            keep = methods.dare_keep_mask(methods.dare_key(p.seed, name, n), flat, p.density)
            out += torch.where(keep, d / p.density, torch.zeros_like(d))
        return b + p.scale * out / (len(ds) if p.normalize else 1)
    raise AssertionError(method)


@pytest.mark.parametrize("method,params", [
    ("average", {}),
    ("task_arithmetic", {"scale": 0.4}),
    ("task_arithmetic", {"scale": 0.4, "normalize": True}),
    ("ties", {"density": 0.3, "scale": 0.9}),
    ("dare", {"density": 0.6, "seed": 11, "scale": 0.5}),
])
def test_k1_is_the_classic_merge(llama_family, tmp_path, method, params):
    cfg = llama_family.merge_config(num_groups=1, method=method, parameters=params, fold_norms=False)
    out = run_merge(cfg, tmp_path / "m", progress=False)
    st = load_dir(out)
    base = load_dir(llama_family.base)
    experts = [load_dir(p) for p in llama_family.experts.values()]
    for name, b in base.items():
        ref = _classic(name, b, [e[name] for e in experts], method, cfg.parameters)
        got = st[name]
        if fmt.is_channel_tensor(name):
            assert got.shape == (1, *b.shape)
            got = got[0]
            assert torch.equal(st[fmt.group_index_name(name)], torch.zeros(4, b.shape[0], dtype=torch.int32))
        assert torch.allclose(got, ref, atol=2e-6, rtol=1e-5), name


def test_k1_ties_with_qwen2_biases(qwen2_tied_family, tmp_path):
    cfg = qwen2_tied_family.merge_config(num_groups=1, method="ties", parameters={"density": 0.5}, fold_norms=False)
    st = load_dir(run_merge(cfg, tmp_path / "m", progress=False))
    base = load_dir(qwen2_tied_family.base)
    experts = [load_dir(p) for p in qwen2_tied_family.experts.values()]
    biases = [n for n in base if n.endswith("q_proj.bias")]
    assert biases, "qwen2 has q/k/v biases"
    for name in biases + ["model.layers.0.self_attn.q_proj.weight"]:
        ref = _classic(name, base[name], [e[name] for e in experts], "ties", cfg.parameters)
        assert st[name].shape == (1, *base[name].shape)
        assert torch.allclose(st[name][0], ref, atol=2e-6), name
    assert "lm_head.weight" not in st  # tied and not folded: stays tied


# -- 1 < K < N: every stored group row against a straight-line reference -----------------------

WEIGHTS = (0.5, 1.0, 2.0, 1.5)
DENSITIES = (0.3, 0.5, 0.8, 1.0)


def _top_density(d: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit `magnitude`: keep the int(density * numel) largest |x| of a whole tensor."""
    if density >= 1.0:
        return d.clone()
    flat = d.reshape(-1)
    top = torch.argsort(flat.abs(), descending=True)[:int(density * flat.numel())]
    out = torch.zeros_like(flat)
    out[top] = flat[top]
    return out.reshape(d.shape)


def _group_delta(method: str, p: dict, rows: torch.Tensor, w: list[float]) -> torch.Tensor:
    """One group's merged task vector from its members' (sparsified) rows [m, I]."""
    wt = torch.tensor(w, dtype=torch.float64).unsqueeze(1)
    rows = rows.double()
    if method == "average":
        return (wt * rows).sum(0) / wt.sum()
    if method in ("task_arithmetic", "dare"):
        out = p.get("scale", 1.0) * (wt * rows).sum(0)
        return out / wt.sum() if p.get("normalize") else out
    assert method == "ties"
    sign = torch.where((wt * rows).sum(0) >= 0, 1.0, -1.0)
    agree = (rows != 0) & (torch.sign(rows) == sign)
    num, den = (wt * rows * agree).sum(0), (wt * agree).sum(0)
    return p.get("scale", 1.0) * torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def _reference_check(name, base, experts, stored, gidx, method, p, weights, densities):
    """Per channel and group: a one-member group is its expert exactly; a larger one is the
    base plus the method's merge of its members' rows. Returns how many multi-member groups
    were checked."""
    b = base.double()
    ds = [e.double() - b for e in experts]
    if method == "ties":
        ds = [_top_density(d, x) for d, x in zip(ds, densities)]
    elif method == "dare":
        flat = torch.arange(b.numel()).reshape(b.shape)
        ds = [torch.where(methods.dare_keep_mask(methods.dare_key(p["seed"], name, n), flat, x), d / x, 0.0)
              if x < 1.0 else d for n, (d, x) in enumerate(zip(ds, densities))]
    n_exp, merged = len(experts), 0
    for c in range(b.shape[0]):
        for g in sorted({int(v) for v in gidx[:, c]}):
            members = [n for n in range(n_exp) if int(gidx[n, c]) == g]
            if len(members) == 1:
                assert torch.equal(stored[g, c], experts[members[0]][c]), (name, c, g)
                continue
            rows = torch.stack([ds[n][c] for n in members])
            want = b[c] + _group_delta(method, p, rows, [weights[n] for n in members])
            assert torch.allclose(stored[g, c].double(), want, atol=2e-6, rtol=1e-5), (name, c, g, members)
            merged += 1
    return merged


VALUE_CASES = [
    ("average", {}),
    ("task_arithmetic", {"scale": 0.8}),
    ("task_arithmetic", {"scale": 0.8, "normalize": True}),
    ("ties", {"scale": 0.9, "density": 0.4}),
    ("dare", {"scale": 0.7, "density": 0.6, "seed": 5, "normalize": True}),
]


@pytest.mark.parametrize("k,weighted", [(2, True), (3, True), (2, False)], ids=["k2-weighted", "k3-weighted", "k2"])
@pytest.mark.parametrize("method,params", VALUE_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_groups_match_a_straight_line_reference(llama_family, tmp_path, method, params, k, weighted):
    """N=4, K=2 and 3: the groups really merge (1 < K < N), with per-expert weights and, for
    ties/dare, per-expert densities, and without (the unit-weight fast paths); the stored
    partition is taken as given."""
    d = llama_family.config(num_groups=k, method=method, parameters=params, fold_norms=False,
                            block_rows=37)  # several row blocks per tensor
    names = list(llama_family.experts)
    weights, densities = (WEIGHTS if weighted else (1.0,) * 4), [params.get("density", 0.5)] * 4
    if weighted:
        for e, w, x in zip(d["experts"], WEIGHTS, DENSITIES):
            e["parameters"] = {"weight": w, **({"density": x} if method in ("ties", "dare") else {})}
        if method in ("ties", "dare"):
            densities = list(DENSITIES)
    st = load_dir(run_merge(parse_config(d), tmp_path / "m", progress=False))
    base = load_dir(llama_family.base)
    experts = [load_dir(llama_family.experts[n]) for n in names]
    merged = 0
    for name, b in base.items():
        e = [x[name] for x in experts]
        if fmt.is_channel_tensor(name):
            gidx = st[fmt.group_index_name(name)]
            assert st[name].shape == (k, *b.shape)
            merged += _reference_check(name, b, e, st[name], gidx, method, params, weights, densities)
        else:  # norms (not folded here): one group of all experts, K=1
            gidx = torch.zeros(4, b.shape[0], dtype=torch.int32)
            _reference_check(name, b.unsqueeze(1), [x.unsqueeze(1) for x in e], st[name].view(1, -1, 1), gidx,
                             method, params, weights, densities)
    assert merged > 1000  # multi-member groups were exercised, not only copies


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_qwen2_bias_is_part_of_the_channel(qwen2_tied_family, tmp_path, method):
    """A bias element follows its row's group; it is sparsified as its own whole tensor."""
    params = {"density": 0.5, "seed": 2} if method == "dare" else {"density": 0.5}
    d = qwen2_tied_family.config(num_groups=2, method=method, parameters=params, fold_norms=False)
    for e, w in zip(d["experts"], (0.5, 2.0, 1.0)):
        e["parameters"] = {"weight": w}
    st = load_dir(run_merge(parse_config(d), tmp_path / "m", progress=False))
    base = load_dir(qwen2_tied_family.base)
    experts = [load_dir(p) for p in qwen2_tied_family.experts.values()]
    name = "model.layers.0.self_attn.k_proj.bias"
    gidx = st[fmt.group_index_name(name.replace(".bias", ".weight"))]
    merged = _reference_check(name, base[name].unsqueeze(1), [e[name].unsqueeze(1) for e in experts],
                              st[name].unsqueeze(2), gidx, method, params, (0.5, 2.0, 1.0), [0.5] * 3)
    assert merged > 0


def test_unused_parameters_change_nothing_and_are_not_recorded(llama_family, tmp_path, caplog):
    """A parameter the method does not read is ignored (as by mergekit), with a warning; the
    checkpoint records what the method did read, per-expert values included."""
    plain = run_merge(llama_family.merge_config(method="average"), tmp_path / "a", progress=False)
    d = llama_family.config(method="average", parameters={"seed": 9, "density": 0.2})
    d["experts"][0]["parameters"] = {"density": 0.1}
    with caplog.at_level("WARNING", logger="merge_tool.config"):
        cfg = parse_config(d)
    assert "method average does not use experts.0.parameters.density, parameters.density, parameters.seed" \
        in caplog.text
    extra = run_merge(cfg, tmp_path / "b", progress=False)
    for f in sorted(p.name for p in plain.glob("*.safetensors")):
        assert (plain / f).read_bytes() == (extra / f).read_bytes()
    saved = yaml.safe_load((extra / fmt.MERGE_CONFIG_FILE).read_text())
    assert saved["parameters"] == {"weight": 1.0} and "parameters" not in saved["experts"][0]
    d = llama_family.config(method="ties", parameters={"density": 0.3})
    d["experts"][1]["parameters"] = {"weight": 2.0, "density": 0.6}
    out = run_merge(parse_config(d), tmp_path / "c", progress=False)
    rep = json.loads((out / fmt.REPORT_FILE).read_text())
    assert rep["parameters"] == {"scale": 1.0, "density": 0.3, "weight": 1.0,
                                 "experts": {"code": {"weight": 2.0, "density": 0.6}}}
    again = parse_config(yaml.safe_load((out / fmt.MERGE_CONFIG_FILE).read_text()))
    assert again.merge_params().weights == (1.0, 2.0, 1.0, 1.0)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_kn_is_bit_exact(llama_family, tmp_path, dtype):
    cfg = llama_family.merge_config(num_groups=4, fold_norms=False, method="ties", dtype=dtype)
    st = load_dir(run_merge(cfg, tmp_path / "m", progress=False))
    experts = [load_dir(p) for p in llama_family.experts.values()]
    for name, g in st.items():
        if not fmt.is_channel_tensor(name) or name.endswith(fmt.GROUP_INDEX_SUFFIX):
            continue
        idx = st[fmt.group_index_name(name)].long()
        for n, e in enumerate(experts):
            want = e[name] if dtype == "auto" else e[name].to(torch.bfloat16)
            assert torch.equal(g[idx[n], torch.arange(g.shape[1])], want), (name, n)


def test_format_v1_round_trip(merged_llama_k2, llama_family):
    d = merged_llama_k2
    cfg = json.loads((d / fmt.CONFIG_FILE).read_text())
    qc = fmt.read_quant_config(cfg)
    assert cfg["architectures"] == ["ChannelMergedLlamaForCausalLM"]
    assert qc.experts == list(llama_family.experts) and qc.num_groups == 2
    assert qc.base_architecture == "LlamaForCausalLM" and qc.method == "average"
    assert qc.folded_norms and all(n.endswith("norm") for n in qc.folded_norms)  # module names
    assert fmt.ChannelMergedConfig.from_dict(qc.to_dict()) == qc
    index = json.loads((d / fmt.INDEX_FILE).read_text())
    st = load_dir(d)
    assert set(index["weight_map"]) == set(st)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in st.values())
    base = load_dir(llama_family.base)
    expected: dict[str, tuple] = {}
    for name, b in base.items():
        expected.update(fmt.expected_shapes(name, tuple(b.shape), qc.groups_for(fmt.module_of(name)), 4))
    assert qc.expert_norms == ["model.norm"]
    expected[fmt.expert_norm_name("model.norm")] = (4, base["model.norm.weight"].shape[0])
    assert {k: tuple(v.shape) for k, v in st.items()} == expected
    for name, t in st.items():
        if name.endswith(fmt.GROUP_INDEX_SUFFIX):
            assert t.dtype == torch.int32 and int(t.min()) >= 0 and int(t.max()) < 2
            assert "g_idx" not in name
            counts = torch.stack([(t == g).sum(0) for g in range(2)])
            assert bool((counts[0] >= counts[1]).all()), f"{name}: group 0 must be the largest"
        elif name.endswith("norm.weight") and fmt.module_of(name) in qc.folded_norms + qc.expert_norms:
            assert torch.equal(t, torch.ones_like(t))
    # fused modules share K; vLLM-style fused names resolve
    assert qc.groups_for("model.layers.0.self_attn.qkv_proj") == 2
    # reproducibility: the merge config and the model card are there
    again = parse_config(yaml.safe_load((d / fmt.MERGE_CONFIG_FILE).read_text()))
    assert again.expert_names == qc.experts and again.num_groups == 2
    card = (d / fmt.MODEL_CARD_FILE).read_text()
    assert "of the ensemble" in card and "Per-layer reconstruction error" in card
    side = load_file(str(d / fmt.NORMS_FILE))
    assert set(side) == {n + ".weight" for n in qc.folded_norms}
    experts = [load_file(str(p / "model.safetensors")) for p in llama_family.experts.values()]
    for n, t in side.items():
        assert torch.equal(t, torch.stack([e[n] for e in experts]))  # [N, hidden], expert order
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(d))("hello world")["input_ids"]


def test_recovers_true_groups(llama_family, tmp_path):
    truth = json.loads((llama_family.experts["math"] / "true_groups.json").read_text())
    st = load_dir(run_merge(llama_family.merge_config(fold_norms=False), tmp_path / "m", progress=False))
    from merge_tool.clustering import relabel
    agree = total = 0
    for name, assign in truth.items():
        got = st[fmt.group_index_name(name)].t().long()
        want = relabel(torch.tensor(assign))
        agree += int((got == want).all(1).sum())
        total += got.shape[0]
    assert agree / total > 0.99


def test_error_falls_as_k_grows(llama_family, tmp_path):
    means = []
    for k in (1, 2, 3, 4):
        out = run_merge(llama_family.merge_config(num_groups=k, fold_norms=False), tmp_path / f"k{k}", progress=False)
        rep = json.loads((out / fmt.REPORT_FILE).read_text())
        errs = [v for t in rep["tensors"].values() if t["kind"] == "channel" for v in t["rel_error"].values()]
        means.append(sum(errs) / len(errs))
        if k == 4:
            assert rep["params"]["ratio"] == pytest.approx(1.0, abs=0.01)
        if k == 1:
            assert rep["params"]["ratio"] == pytest.approx(0.25, abs=0.01)
    assert means[0] > means[1] > means[2] > means[3] == 0.0
    assert means[1] < 0.5 * means[0]  # the right grouping removes most of the interference


def test_exclude_and_overrides_store_k1_layout(llama_family, tmp_path):
    cfg = llama_family.merge_config(exclude=["*.mlp.*"], num_groups_overrides={"lm_head": 1})
    out = run_merge(cfg, tmp_path / "m", progress=False)
    st = load_dir(out)
    qc = fmt.read_quant_config(json.loads((out / fmt.CONFIG_FILE).read_text()))
    assert st["model.layers.0.mlp.up_proj.weight"].shape[0] == 1
    assert int(st["model.layers.0.mlp.up_proj.group_index"].abs().sum()) == 0
    assert st["lm_head.weight"].shape[0] == 1
    assert st["model.layers.0.self_attn.q_proj.weight"].shape[0] == 2
    assert qc.num_groups_overrides["lm_head"] == 1
    assert qc.groups_for("model.layers.1.mlp.gate_up_proj") == 1


def test_deterministic_and_sharded(llama_family, tmp_path):
    cfg = llama_family.merge_config(method="dare", max_shard_size="150KB")
    a = run_merge(cfg, tmp_path / "a", progress=False)
    b = run_merge(cfg, tmp_path / "b", progress=False)
    fa = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(fa) > 3 and fa[0] == f"model-00001-of-{len(fa):05d}.safetensors"
    for f in fa:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    index = json.loads((a / fmt.INDEX_FILE).read_text())
    from safetensors import safe_open
    for name, f in index["weight_map"].items():
        with safe_open(str(a / f), "pt") as h:
            assert name in h.keys()


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_similarity_picks_the_closest_pair(mistral_family, tmp_path, similarity):
    """3 experts, K=2: the exact partition puts the two closest task vectors of each channel
    together (k-means cost of {a|bc} is |b-c|^2/2), closest by angle for cosine and by
    distance for euclidean."""
    out = run_merge(mistral_family.merge_config(similarity=similarity, fold_norms=False), tmp_path / "m",
                    progress=False)
    assert fmt.read_quant_config(json.loads((out / fmt.CONFIG_FILE).read_text())).similarity == similarity
    st = load_dir(out)
    base = load_dir(mistral_family.base)
    experts = [load_dir(p) for p in mistral_family.experts.values()]
    checked = 0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        d = torch.stack([e[name].double() - base[name].double() for e in experts])  # [3, out, in]
        if similarity == "cosine":
            d = d / d.norm(dim=2, keepdim=True)
        gi = st[fmt.group_index_name(name)]
        for c in range(d.shape[1]):
            pairs = {(0, 1): 2, (0, 2): 1, (1, 2): 0}  # pair -> the expert left alone
            dist = {pq: float((d[pq[0], c] - d[pq[1], c]).norm()) for pq in pairs}
            a, b = min(dist, key=dist.get)
            alone = pairs[(a, b)]
            assert gi[a, c] == gi[b, c] != gi[alone, c], (name, c, dist)
            checked += 1
    assert checked > 500


def test_cosine_and_euclidean_differ_on_scaled_experts(tmp_path):
    """Expert c = base + 3 * (a - base) is a's direction with another magnitude; b is a plus noise.
    Cosine groups a with c in every channel; euclidean groups the two small ones."""
    from safetensors.torch import save_file

    from merge_tool.synthetic import make_family

    base_dir, dirs = make_family(tmp_path / "src", ["a", "b", "c"], true_groups=3)
    base, a = load_dir(base_dir), load_dir(dirs["a"])
    b = load_dir(dirs["b"])
    gen = torch.Generator().manual_seed(3)
    for name, t in base.items():
        if fmt.is_channel_tensor(name) and name.endswith(".weight"):
            # b: a's task vector plus a small perturbation, so it is nearer a than c is (euclidean)
            b[name] = a[name] + 0.3 * (a[name] - t).abs().mean() * torch.randn(t.shape, generator=gen)
    c = {n: (base[n] + 3 * (a[n] - base[n])) for n in base}
    save_file(b, str(dirs["b"] / "model.safetensors"), metadata={"format": "pt"})
    save_file(c, str(dirs["c"] / "model.safetensors"), metadata={"format": "pt"})
    d = {"base_model": str(base_dir), "experts": [{"name": n, "model": str(p)} for n, p in dirs.items()],
         "num_groups": 2, "fold_norms": False}
    q = fmt.group_index_name("model.layers.0.self_attn.q_proj.weight")
    cos = load_dir(run_merge(parse_config({**d, "similarity": "cosine"}), tmp_path / "cos", progress=False))[q]
    euc = load_dir(run_merge(parse_config({**d, "similarity": "euclidean"}), tmp_path / "euc", progress=False))[q]
    assert bool((cos[0] == cos[2]).all()) and bool((cos[1] != cos[0]).all())  # same direction: a, c
    assert bool((euc[0] == euc[1]).all()) and bool((euc[2] != euc[0]).all())  # nearest: a, b


def test_force_overwrites(merged_llama_k2, llama_family, tmp_path):
    out = tmp_path / "m"
    run_merge(llama_family.merge_config(num_groups=1), out, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        run_merge(llama_family.merge_config(num_groups=2), out, progress=False)
    run_merge(llama_family.merge_config(num_groups=3), out, force=True, progress=False)
    assert fmt.read_quant_config(json.loads((out / fmt.CONFIG_FILE).read_text())).num_groups == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu(llama_family, tmp_path):
    cfg = llama_family.merge_config(method="ties")
    a = load_dir(run_merge(cfg, tmp_path / "cpu", progress=False))
    b = load_dir(run_merge(cfg, tmp_path / "gpu", device="cuda", progress=False))
    for k in a:
        if k.endswith(fmt.GROUP_INDEX_SUFFIX):
            assert (a[k] != b[k]).float().mean() < 0.01
        else:
            assert torch.allclose(a[k], b[k], atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_cuda_requested_without_gpu_is_clear(llama_family, tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        run_merge(llama_family.merge_config(), tmp_path / "m", device="cuda", progress=False)
    assert not list(tmp_path.iterdir())


def test_experts_equal_to_base_leave_groups_empty(llama_family, tmp_path):
    """Zero task vectors: every channel is one group; the unused group rows copy group 0."""
    d = llama_family.config(num_groups=2, method="ties", collapse_identical=False)
    for e in d["experts"][:3]:
        e["model"] = str(llama_family.base)
    d["experts"] = d["experts"][:3]
    out = run_merge(parse_config(d), tmp_path / "m", progress=False)
    st, base = load_dir(out), load_dir(llama_family.base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert int(st[fmt.group_index_name(q)].abs().sum()) == 0
    assert torch.equal(st[q][0], st[q][1])
    rep = json.loads((out / fmt.REPORT_FILE).read_text())
    assert all(v == 0.0 for t in rep["tensors"].values() if t["kind"] == "channel" for v in t["outside_group0"].values())


def test_identical_tensors_are_stored_once(tmp_path):
    """Frozen embeddings (identical in every expert) are stored once, exactly, whatever the
    method; the final norm is kept per expert, so a tied lm_head stays tied."""
    from merge_tool.synthetic import make_family

    base, dirs = make_family(tmp_path / "src", ["a", "b", "c"], tie_word_embeddings=True,
                             frozen=("embed_tokens",))
    d = {"base_model": str(base), "experts": [{"name": n, "model": str(p)} for n, p in dirs.items()],
         "num_groups": 2, "method": "ties", "parameters": {"density": 0.3}}
    out = run_merge(parse_config(d), tmp_path / "m", progress=False)
    st, b = load_dir(out), load_dir(base)
    emb, q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"
    assert st[emb].shape == (1, *b[emb].shape) and torch.equal(st[emb][0], b[emb])  # exact, not trimmed
    assert int(st[fmt.group_index_name(emb)].abs().sum()) == 0
    assert st[q].shape[0] == 2 and "lm_head.weight" not in st
    cfg = json.loads((out / fmt.CONFIG_FILE).read_text())
    assert cfg["tie_word_embeddings"] is True
    qc = fmt.read_quant_config(cfg)
    assert qc.num_groups_overrides == {"model.embed_tokens": 1} and qc.expert_norms == ["model.norm"]
    experts = [load_dir(p) for p in dirs.values()]
    assert torch.equal(st[fmt.expert_norm_name("model.norm")], torch.stack([e["model.norm.weight"] for e in experts]))
    rep = json.loads((out / fmt.REPORT_FILE).read_text())
    assert rep["identical_tensors"] == [emb] and rep["tensors"][emb]["identical_across_experts"]
    assert all(v == 0.0 for v in rep["tensors"][emb]["rel_error"].values())
    # without K=1 storage, 2 x the embedding and a larger ratio
    off = run_merge(parse_config({**d, "collapse_identical": False}), tmp_path / "off", progress=False)
    assert load_dir(off)[emb].shape[0] == 2
    assert json.loads((off / fmt.REPORT_FILE).read_text())["params"]["ratio"] > rep["params"]["ratio"]


def test_identical_member_of_a_fused_family_keeps_its_k(tmp_path):
    """q/k/v share K in vLLM: q alone identical is not collapsed."""
    from merge_tool.synthetic import make_family

    base, dirs = make_family(tmp_path / "src", ["a", "b"], frozen=("q_proj",))
    d = {"base_model": str(base), "experts": [{"name": n, "model": str(p)} for n, p in dirs.items()],
         "num_groups": 2}
    st = load_dir(run_merge(parse_config(d), tmp_path / "m", progress=False))
    assert st["model.layers.0.self_attn.q_proj.weight"].shape[0] == 2
    assert st["model.layers.0.self_attn.k_proj.weight"].shape[0] == 2
