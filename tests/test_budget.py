"""Merging under a memory budget (format v2, a row table): the allocation, the checkpoint it
writes, and what reads it back (extract, inspect, the dry run)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_tool import budget
from merge_tool.cli import main
from merge_tool.config import ConfigError, parse_config
from merge_tool.extract import extract_expert
from merge_tool.inspect import format_table, inspect_checkpoint
from merge_tool.merge import plan_merge, run_merge
from merge_tool.plan import format_plan
from vllm_channelmerge import format as fmt, rowtable


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def channel_weights(st: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in st if fmt.is_channel_tensor(n)]


def lookup_v1(st: dict[str, torch.Tensor], name: str, e: int) -> torch.Tensor:
    idx = st[fmt.group_index_name(name)]
    rows, ri = rowtable.from_groups(st[name], idx)
    return rows[ri[e]]


def lookup_v2(st: dict[str, torch.Tensor], name: str, e: int) -> torch.Tensor:
    return rowtable.lookup(st[name], st[fmt.row_index_name(name)], e)


# -- the allocation on its own: against brute force --------------------------------------------


def _random_curves(gen: torch.Generator, shapes: list[tuple[int, int, float]], convex: bool) -> list[budget.Curve]:
    """Curves with k = 1..K options, every option using k groups; `convex`: diminishing gains."""
    curves = []
    for t, (out, k, cost) in enumerate(shapes):
        gains = torch.rand(out, k - 1, generator=gen, dtype=torch.float64) + 0.01
        if convex:
            gains = gains.sort(1, descending=True).values
        e1 = gains.sum(1, keepdim=True) + torch.rand(out, 1, generator=gen, dtype=torch.float64)
        err = torch.cat([e1, e1 - torch.cumsum(gains, 1)], 1)
        groups = torch.arange(1, k + 1).expand(out, k).clone()
        curves.append(budget.Curve(f"t{t}", err, groups, cost))
    return curves


def _value(curves: list[budget.Curve], choice: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(total error, cost of the extra rows) of a choice of k per channel."""
    err = cost = 0.0
    for cv in curves:
        k = choice[cv.name]
        ar = torch.arange(cv.channels)
        err += float(cv.error[ar, k - 1].sum())
        cost += float((cv.groups[ar, k - 1] - 1).sum()) * cv.row_cost
    return err, cost


def _brute_force(curves: list[budget.Curve], available: float) -> float:
    """The least total error of any choice whose extra rows fit in `available`."""
    chans = [(cv, c) for cv in curves for c in range(cv.channels)]
    best = float("inf")
    for ks in itertools.product(*[range(cv.error.shape[1]) for cv, _ in chans]):
        cost = sum((int(cv.groups[c, k]) - 1) * cv.row_cost for (cv, c), k in zip(chans, ks))
        if cost <= available + 1e-9:
            best = min(best, sum(float(cv.error[c, k]) for (cv, c), k in zip(chans, ks)))
    return best


def test_greedy_is_optimal_for_equal_row_costs_and_diminishing_gains():
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        curves = _random_curves(gen, [(3, 3, 5.0), (2, 3, 5.0)], convex=True)
        for rows in range(0, 11):
            choice = budget.allocate(curves, rows * 5.0)
            err, cost = _value(curves, choice)
            assert cost <= rows * 5.0
            assert err == pytest.approx(_brute_force(curves, rows * 5.0), rel=1e-12, abs=1e-12), (trial, rows)


def test_greedy_is_near_optimal_with_unequal_costs_and_any_curves():
    """Rows of different widths (a knapsack): never over the budget, and within one step's gain
    of the optimum (the LP bound of a greedy by gain per unit)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        curves = _random_curves(gen, [(2, 3, 3.0), (2, 3, 7.0), (2, 2, 4.0)], convex=trial % 2 == 0)
        max_gain = max(float((cv.error[:, 0] - cv.error[:, -1]).max()) for cv in curves)
        for available in [0.0, 3.0, 6.5, 10.0, 14.0, 21.0, 30.0, 100.0]:
            err, cost = _value(curves, budget.allocate(curves, available))
            assert cost <= available
            assert err <= _brute_force(curves, available) + max_gain + 1e-12


def test_allocation_is_monotone_in_the_budget():
    gen = torch.Generator().manual_seed(2)
    curves = _random_curves(gen, [(40, 3, 3.0), (30, 4, 5.0), (20, 2, 11.0)], convex=False)
    for criterion in ("weight", "weight_per_tensor"):
        last_err, last_cost = float("inf"), -1.0
        for available in range(0, 700, 13):
            err, cost = _value(curves, budget.allocate(curves, float(available), criterion))
            assert cost <= available
            assert err <= last_err + 1e-9 and cost >= last_cost, (criterion, available)
            last_err, last_cost = err, cost
        full = budget.allocate(curves, 1e9, criterion)  # enough for everything: K where it helps
        assert all(bool((full[cv.name] == cv.error.shape[1]).all()) for cv in curves)


def test_rows_follow_the_groups_a_partition_really_uses():
    """A channel whose experts agree (k groups use fewer) gets no row that removes nothing, and
    a step that only pays off two rows later is weighed with them (the convex hull)."""
    err = torch.tensor([[4.0, 4.0, 4.0], [9.0, 8.9, 0.0], [3.0, 1.0, 0.5]], dtype=torch.float64)
    groups = torch.tensor([[1, 1, 1], [1, 2, 3], [1, 2, 3]])
    cv = budget.Curve("t", err, groups, 1.0)
    st = budget.hull_steps(err, groups)
    assert st.target[0].tolist() == [-1, -1]  # nothing to gain
    assert st.target[1].tolist() == [2, -1] and st.rows[1].tolist() == [2, 0]  # 9 -> 0 in one 2-row step
    assert budget.allocate([cv], 100.0)["t"].tolist() == [1, 3, 3]
    assert budget.allocate([cv], 2.0)["t"].tolist() == [1, 3, 1]  # 4.5 per row beats 2 then 0.5
    rows = budget.tensor_rows(cv, budget.allocate([cv], 100.0)["t"], 3)
    assert rows.rows.tolist() == [1, 3, 3] and rows.extra_rows == 4 and rows.histogram() == [1, 0, 2]


def test_weight_per_tensor_gives_every_tensor_the_same_share():
    gen = torch.Generator().manual_seed(3)
    curves = _random_curves(gen, [(100, 2, 1.0), (50, 2, 4.0)], convex=True)
    choice = budget.allocate(curves, 90.0, "weight_per_tensor")
    shares = [float((choice[cv.name] - 1).sum()) / cv.channels for cv in curves]
    assert shares[0] == pytest.approx(shares[1], abs=0.02) and 0.2 < shares[0] < 0.5
    # the global criterion spends on the cheap rows of t0 first
    glob = budget.allocate(curves, 90.0, "weight")
    assert float((glob["t0"] - 1).sum()) / 100 > shares[0]


def test_weight_relative_compares_tensors_on_their_own_scale():
    """Two tensors with the same curves up to a factor 1000 (a norm folded into one, say):
    `weight` spends everything on the large one, `weight_relative` on both alike."""
    err = torch.linspace(1.0, 2.0, 40, dtype=torch.float64).unsqueeze(1) * torch.tensor([1.0, 0.2], dtype=torch.float64)
    groups = torch.tensor([1, 2]).repeat(40, 1)
    small, large = budget.Curve("small", err, groups, 1.0), budget.Curve("large", 1000 * err, groups, 1.0)
    glob = budget.allocate([small, large], 40.0, "weight")
    assert int((glob["large"] - 1).sum()) == 40 and int((glob["small"] - 1).sum()) == 0
    rel = budget.allocate([small, large], 40.0, "weight_relative")
    assert int((rel["large"] - 1).sum()) == 20 == int((rel["small"] - 1).sum())


# -- the merge under a budget ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_merge(llama_family, tmp_path_factory):
    """K=3, budget 0.35, defaults otherwise (norms folded)."""
    out = tmp_path_factory.mktemp("budget") / "m"
    cfg = llama_family.merge_config(num_groups=3, budget=0.35)
    return run_merge(cfg, out, progress=False), cfg


def test_budget_merge_meets_the_budget_and_writes_format_v2(budget_merge, llama_family):
    out, cfg = budget_merge
    qc = fmt.read_checkpoint_config(out)
    assert qc.format_version == fmt.ROW_TABLE_VERSION and qc.num_groups == 3 and qc.row_table
    assert qc.budget["params_ratio"] == 0.35 and qc.budget["criterion"] == "weight_per_tensor"
    report = json.loads((out / fmt.REPORT_FILE).read_text())
    assert report["format_version"] == 2
    params = report["params"]
    # met: below the budget by less than the widest row
    assert params["stored"] <= 0.35 * params["ensemble"] < params["stored"] + 512 + 1
    assert report["budget"]["achieved_ratio"] == pytest.approx(params["ratio"])
    assert report["budget"]["min_ratio"] < 0.26 and report["budget"]["max_ratio"] > 0.74
    assert 0 < report["budget"]["error_removed"] < 1
    st = load_dir(out)
    assert not any(n.endswith(fmt.GROUP_INDEX_SUFFIX) for n in st)
    n_extra = 0
    for name in channel_weights(st):
        if not name.endswith(".weight"):
            continue
        ri = st[fmt.row_index_name(name)]
        out_rows = ri.shape[1]
        extra = qc.extra_rows.get(fmt.module_of(name), 0)
        assert ri.dtype == torch.int32 and ri.shape == (4, st[name].shape[0] - extra)
        rowtable.check_row_index(name, ri, st[name].shape[0])
        n_extra += st[name].shape[0] - out_rows
        assert sum(report["tensors"][name]["rows_per_channel"]) == out_rows
        for c in range(out_rows):  # the primary row is the largest group (ties: the lowest expert id)
            members = {r: [e for e in range(4) if int(ri[e, c]) == r] for r in ri[:, c].tolist()}
            primary = members.get(c, [])
            assert all((len(primary), -primary[0]) > (len(m), -m[0]) for r, m in members.items() if r != c), (name, c)
    assert n_extra == sum(qc.extra_rows.values()) > 0
    for shard in fmt.checkpoint_shards(str(out)):
        meta = fmt.read_safetensors_header(shard)["__metadata__"]
        assert meta[fmt.SHARD_FORMAT_KEY] == "2"
    fmt.check_checkpoint_experts(str(out), qc.experts)
    kinds = {r["kind"] for r in report["allocation"]["by_kind"]}
    assert {"q_proj", "down_proj", "embed_tokens", "lm_head"} <= kinds
    card = (out / fmt.MODEL_CARD_FILE).read_text()
    assert "memory budget 0.35" in card and "## Rows per channel" in card and "down_proj" in card


def test_the_dry_run_plan_is_what_the_budget_merge_writes(budget_merge, tmp_path, capsys):
    out, cfg = budget_merge
    plan = plan_merge(cfg, tmp_path / "dry")
    index = json.loads((out / fmt.INDEX_FILE).read_text())
    assert index["weight_map"] == plan.weight_map and index["metadata"]["total_size"] == plan.output_bytes
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            got.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})
    assert got == {t.name: list(t.shape) for t in plan.outputs}
    text = format_plan(plan)
    assert "row allocation (format v2): budget params_ratio 0.35, criterion weight_per_tensor" in text
    assert "error removed:" in text and "q_proj" in text and "model.layers.1" in text


def test_merge_and_dry_run_print_the_allocation(llama_family, tmp_path, capsys):
    import yaml

    y = tmp_path / "merge.yaml"
    y.write_text(yaml.safe_dump(llama_family.config(num_groups=3, budget_bytes="2.5MB")))
    assert main(["merge", str(y), str(tmp_path / "m"), "--dry-run", "-q"]) == 0
    dry = capsys.readouterr().out
    assert "row allocation (format v2): budget 2,500,000 bytes, criterion weight" in dry
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(y), str(tmp_path / "m"), "-q"]) == 0
    real = capsys.readouterr().out
    table = dry[dry.index("row allocation"):dry.index("stored:")]
    assert table in real and real.index("row allocation") < real.index("wrote ")
    report = json.loads((tmp_path / "m" / fmt.REPORT_FILE).read_text())
    assert report["budget"]["achieved_bytes"] <= 2_500_000 and report["budget"]["bytes"] == 2_500_000
    assert json.loads((tmp_path / "m" / fmt.INDEX_FILE).read_text())["metadata"]["total_size"] <= 2_500_000


@pytest.mark.parametrize("k,method,extra", [
    (2, "average", {}),
    (3, "ties", {"parameters": {"density": 0.5}}),
    (3, "average", {"kmeans_threshold": 1, "block_rows": 50}),  # k-means partitions, several blocks
])
def test_a_budget_above_uniform_k_is_the_v1_merge(llama_family, tmp_path, k, method, extra):
    """Enough budget for K rows everywhere: every expert looks up exactly the weights of the
    v1 merge with the same K (the same partitions, merged by the same method)."""
    v1 = load_dir(run_merge(llama_family.merge_config(num_groups=k, method=method, **extra), tmp_path / "v1",
                            progress=False))
    out = run_merge(llama_family.merge_config(num_groups=k, method=method, budget=1.0, **extra), tmp_path / "v2",
                    progress=False)
    v2 = load_dir(out)
    for name in channel_weights(v1):
        if name.endswith(".weight"):
            assert v2[name].shape[0] == k * v1[name].shape[1], name  # K rows for every channel
        for e in range(4):
            assert torch.equal(lookup_v2(v2, name, e), lookup_v1(v1, name, e)), (name, e)
    report = json.loads((out / fmt.REPORT_FILE).read_text())
    assert report["budget"]["error_removed"] == pytest.approx(1.0)
    assert report["params"]["ratio"] < 1.0  # allowed above what uniform K stores; not spent


def test_extract_of_a_v2_merge_is_the_lookup(llama_family, tmp_path):
    out = run_merge(llama_family.merge_config(num_groups=3, budget=0.4, fold_norms=False), tmp_path / "m",
                    progress=False)
    st = load_dir(out)
    for e, name in enumerate(llama_family.experts):
        dense = load_dir(extract_expert(out, name, tmp_path / f"x_{name}"))
        for t in channel_weights(st):
            assert torch.equal(dense[t], lookup_v2(st, t, e)), (name, t)
        assert fmt.row_index_name(channel_weights(st)[0]) not in dense
        cfg = json.loads((tmp_path / f"x_{name}" / fmt.CONFIG_FILE).read_text())
        assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]


def test_extract_of_a_folded_v2_merge_unfolds_the_norms(llama_family, tmp_path):
    """Norms folded: extract of the v2 merge at a budget above K equals extract of the v1 merge."""
    v1 = run_merge(llama_family.merge_config(num_groups=2), tmp_path / "v1", progress=False)
    v2 = run_merge(llama_family.merge_config(num_groups=2, budget=0.9), tmp_path / "v2", progress=False)
    a = load_dir(extract_expert(v1, "code", tmp_path / "a"))
    b = load_dir(extract_expert(v2, "code", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_qwen2_biases_follow_their_rows(qwen2_tied_family, tmp_path):
    """A bias element is part of its channel: `[R]`, looked up through the same row index; above
    uniform K it equals the v1 merge's, and extract reads it; a tied lm_head stays tied."""
    fam = qwen2_tied_family
    v1 = load_dir(run_merge(fam.merge_config(num_groups=2, fold_norms=False), tmp_path / "v1", progress=False))
    full = load_dir(run_merge(fam.merge_config(num_groups=2, fold_norms=False, budget=1.0), tmp_path / "full",
                              progress=False))
    biases = [n for n in channel_weights(v1) if n.endswith(".bias")]
    assert biases
    for name in channel_weights(v1):
        for e in range(3):
            assert torch.equal(lookup_v2(full, name, e), lookup_v1(v1, name, e)), (name, e)
    out = run_merge(fam.merge_config(num_groups=2, fold_norms=False, budget=0.45), tmp_path / "v2", progress=False)
    st = load_dir(out)
    dense = load_dir(extract_expert(out, "b", tmp_path / "x"))
    for bias in biases:
        weight = bias.replace(".bias", ".weight")
        assert st[bias].shape == (st[weight].shape[0],)
        assert torch.equal(dense[bias], lookup_v2(st, bias, 1)) and torch.equal(dense[weight], lookup_v2(st, weight, 1))
    assert sum(fmt.read_checkpoint_config(out).extra_rows.values()) > 0
    assert json.loads((out / fmt.CONFIG_FILE).read_text())["tie_word_embeddings"] is True


def test_extract_refuses_an_invalid_row_index(budget_merge, tmp_path):
    out, _ = budget_merge
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = fmt.checkpoint_shards(str(bad))[0]
    meta = fmt.read_safetensors_header(shard)["__metadata__"]
    st = load_file(shard)
    name = fmt.row_index_name("model.layers.1.mlp.up_proj.weight")
    st[name][2, 5] = 6  # channel 5 of expert 2 reads channel 6's primary row
    save_file(st, shard, metadata=meta)
    with pytest.raises(fmt.FormatError) as ei:
        extract_expert(bad, "chat", tmp_path / "x")
    assert name in str(ei.value) and "channel 5" in str(ei.value)
    assert not (tmp_path / "x").exists()


def test_inspect_reads_v2(budget_merge):
    out, _ = budget_merge
    info = inspect_checkpoint(out)
    assert info["format_version"] == 2 and info["budget"]["params_ratio"] == 0.35
    q = next(t for t in info["tensors"] if t["tensor"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["rows"] == q["shape"][0] + info["extra_rows"]["model.layers.0.self_attn.q_proj"] and q["num_groups"] == 3
    assert info["params_stored"] == json.loads((out / fmt.REPORT_FILE).read_text())["params"]["stored"]
    table = format_table(info)
    assert "(format v2," in table and "memory budget (format v2, row table): params_ratio 0.35" in table
    assert "outside primary row" in table and "embed_tokens" in table and "error removed" in table
    json.dumps(info)


def test_no_budget_writes_v1_exactly_as_before(merged_llama_k2):
    """Without a budget nothing of format v2 appears: config.json, the merge config and the report."""
    qc = json.loads((merged_llama_k2 / fmt.CONFIG_FILE).read_text())["quantization_config"]
    assert qc["format_version"] == 1 and "extra_rows" not in qc and "budget" not in qc
    import yaml

    saved = yaml.safe_load((merged_llama_k2 / fmt.MERGE_CONFIG_FILE).read_text())
    assert not {"budget", "budget_bytes", "budget_criterion"} & set(saved)
    report = json.loads((merged_llama_k2 / fmt.REPORT_FILE).read_text())
    assert "budget" not in report and "allocation" not in report and report["format_version"] == 1


def test_the_criteria(llama_family, tmp_path):
    """`weight_per_tensor` (the default): the same share of extra rows in every tensor; `weight`:
    where the error is; `method`: errors after the in-group method; all meet the budget and are
    recorded."""
    per = run_merge(llama_family.merge_config(num_groups=2, budget=0.35, budget_criterion="weight_per_tensor"),
                    tmp_path / "per", progress=False)
    qc = fmt.read_checkpoint_config(per)
    report = json.loads((per / fmt.REPORT_FILE).read_text())
    shares = [qc.extra_rows.get(fmt.module_of(n), 0) / t["shape"][0] for n, t in report["tensors"].items()
              if t["kind"] == "channel"]
    assert max(shares) - min(shares) < 0.02 and max(shares) > 0.1
    assert report["params"]["stored"] <= 0.35 * report["params"]["ensemble"]
    assert qc.budget["criterion"] == "weight_per_tensor"
    default = run_merge(llama_family.merge_config(num_groups=2, budget=0.35), tmp_path / "default", progress=False)
    assert fmt.read_checkpoint_config(default).extra_rows == qc.extra_rows  # weight_per_tensor is the default
    glob = run_merge(llama_family.merge_config(num_groups=2, budget=0.35, budget_criterion="weight"),
                     tmp_path / "glob", progress=False)
    gq = fmt.read_checkpoint_config(glob)
    gshares = [gq.extra_rows.get(fmt.module_of(n), 0) / t["shape"][0] for n, t in report["tensors"].items()
               if t["kind"] == "channel"]
    assert max(gshares) - min(gshares) > 0.05  # the global criterion spends where the error is
    meth = run_merge(llama_family.merge_config(num_groups=3, method="ties", budget=0.35, budget_criterion="method"),
                     tmp_path / "meth", progress=False)
    rep = json.loads((meth / fmt.REPORT_FILE).read_text())
    assert rep["budget"]["criterion"] == "method" and rep["params"]["stored"] <= 0.35 * rep["params"]["ensemble"]
    assert 0 < rep["budget"]["error_removed"] < 1


# -- bad budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,needle", [
    ({"budget": 0.3, "budget_bytes": "2MB"}, "budget and budget_bytes are mutually exclusive"),
    ({"budget_criterion": "weight"}, "budget_criterion is 'weight' but there is no budget"),
    ({"budget": 0.3, "budget_criterion": "loss"},
     "budget_criterion: got 'loss'; allowed values: weight, weight_relative, weight_per_tensor, method"),
    ({"budget": 0}, "budget: is 0; it must be in (0, 1]"),
    ({"budget": 1.5}, "budget: is 1.5; it must be in (0, 1]"),
    ({"budget": "35%"}, "budget: expected a number"),
    ({"budget_bytes": "lots"}, "budget_bytes: 'lots' is not a size"),
])
def test_bad_budget_fields(fields, needle):
    d = {"base_model": "b", "experts": [{"name": "a", "model": "a"}, {"name": "c", "model": "c"}], "num_groups": 2,
         **fields}
    with pytest.raises(ConfigError) as ei:
        parse_config(d, "merge.yaml")
    assert str(ei.value).startswith("merge.yaml: ") and needle in str(ei.value)
    assert len(str(ei.value).splitlines()) == 1


@pytest.mark.parametrize("fields,needle", [
    ({"num_groups": 2, "budget": 0.2},
     "budget: 0.2 is below the minimum this merge can store, 0.2503 of the ensemble's parameters (one row per "
     "channel); the most it can use is 0.4999 (K rows everywhere)"),
    ({"num_groups": 1, "budget": 0.5}, "budget: 0.5: no channel can get a second row (num_groups is 1"),
    ({"num_groups": 2, "budget_bytes": "1MB"}, "budget_bytes: 1MB (1,000,000 bytes) is below the minimum"),
])
def test_budgets_the_merge_cannot_meet(llama_family, tmp_path, capsys, fields, needle):
    with pytest.raises(ConfigError) as ei:
        plan_merge(llama_family.merge_config(**fields), tmp_path / "m")
    assert needle in str(ei.value)
    if "the most it can use is" in needle:  # the v1 merge's K=1 and K=2 ratios
        lo, hi = (plan_merge(llama_family.merge_config(num_groups=k), tmp_path / "m").param_ratio for k in (1, 2))
        assert f"{hi:.4f} (K rows everywhere)" in needle and f"{lo:.4f} of the ensemble's" in needle
    import yaml

    y = tmp_path / "merge.yaml"
    y.write_text(yaml.safe_dump(llama_family.config(**fields)))
    assert main(["merge", str(y), str(tmp_path / "m"), "-q"]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_the_write_pass_reuses_the_measured_partitions(llama_family, tmp_path, monkeypatch):
    """The write pass takes each channel's partition from the measuring pass instead of
    clustering again: the same bytes as clustering again (and checking the group counts)."""
    from merge_tool import merge as mergemod

    cfg = llama_family.merge_config(num_groups=3, method="ties", budget=0.4)
    cached = run_merge(cfg, tmp_path / "cached", progress=False)
    used: list[bool] = []
    of = mergemod._RowTable.of

    def recomputed(job):
        t = of(job)
        used.append(t.partition is not None)
        t.partition = None
        return t
    monkeypatch.setattr(mergemod._RowTable, "of", staticmethod(recomputed))
    again = run_merge(cfg, tmp_path / "again", progress=False)
    assert used and any(used)
    a, b = load_dir(cached), load_dir(again)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
