"""Cross-check against mergekit: a K=1 `channelmerge merge` is the classic merge users would
otherwise run with `mergekit-yaml`.

Same experts, same parameters, both tools, every tensor compared (docs/merge-config.md,
"Compared with mergekit"):

- `average` = mergekit `linear`, `task_arithmetic` = `task_arithmetic` (normalize on and off),
  `ties` = `ties`: the same tensors, max abs difference <= 1e-5 in float32.
- Where the definitions differ, each tool is shown to compute ITS documented formula: mergekit's
  `ties` with `normalize: false` (ours always normalizes), TIES trimming at exact ties in |tau|,
  mergekit's default density 1.0 (ours 0.5).
- `dare` vs mergekit `dare_linear` (random): keep rate and rescale, statistically, fixed seeds.
  Ours rescales every kept entry by exactly 1/density; mergekit (`rescale: true`, its default)
  rescales each tensor so that its L1 norm is unchanged, a factor that is only about 1/density.

Our side is read through `extract_expert` (the dense view of one expert of the K=1 checkpoint),
with `fold_norms: false`: folding multiplies each expert's RMSNorm into its linear layers before
merging, which is not mergekit's definition (docs). mergekit runs in-process on the CPU, float32,
absolute paths (a relative one is looked up on the model hub), no tokenizer copy; the global RNG
state is restored after each run.

scripts/setup.sh installs mergekit (test environment only; the product never imports it). The
module is skipped only when mergekit is not installed; an installed mergekit that fails to
import is an error, not a skip.
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

if importlib.util.find_spec("mergekit") is None:
    pytest.skip("mergekit is not installed (bash scripts/setup.sh installs it: pip install --no-deps "
                "mergekit immutables peft accelerate)", allow_module_level=True)

with warnings.catch_warnings():  # mergekit 0.1.5 touches numpy.core at import (DeprecationWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import mergekit.merge  # noqa: E402  (installed: a broken install must fail, not skip)
    from mergekit.config import MergeConfiguration  # noqa: E402
    from mergekit.sparsify import magnitude as mk_magnitude  # noqa: E402

from merge_tool import methods  # noqa: E402
from merge_tool.config import parse_config  # noqa: E402
from merge_tool.extract import extract_expert  # noqa: E402
from merge_tool.merge import run_merge  # noqa: E402

NAMES = ["math", "code", "chat", "zh"]
WEIGHTS = (0.5, 1.0, 2.0, 1.5)
DENSITIES = (0.3, 0.5, 0.8, 0.6)
FROZEN = "embed_tokens"  # identical in every expert (and the base), as when fine-tuning freezes it
TOL = 1e-5


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


class Fam:
    def __init__(self, root: Path, base: Path, experts: list[Path]):
        self.root, self.base, self.experts = root, base, experts
        self.B = load_dir(base)
        self.E = [load_dir(p) for p in experts]


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> Fam:
    """4 tiny float32 Llama experts (hidden 128, 2 layers), embeddings frozen."""
    from merge_tool.synthetic import make_family

    root = tmp_path_factory.mktemp("mk_fam")
    base, experts = make_family(root, NAMES, arch="llama", seed=3, frozen=(FROZEN,))
    f = Fam(root, base, [experts[n] for n in NAMES])
    assert all(b.dtype == torch.float32 for b in f.B.values())
    return f


# -- running both tools ------------------------------------------------------------------------


def run_mergekit(method: str, base: Optional[Path], experts: list[Path], out: Path,
                 params: dict[str, Any], per_expert: list[dict[str, Any]], seed: Optional[int] = None
                 ) -> dict[str, torch.Tensor]:
    """`mergekit-yaml` in-process: CPU, float32, absolute paths, no tokenizer, no model card."""
    cfg: dict[str, Any] = {
        "merge_method": method, "dtype": "float32", "parameters": params,
        "models": [{"model": str(Path(p).absolute()), "parameters": pe} for p, pe in zip(experts, per_expert)],
    }
    if base is not None:
        cfg["base_model"] = str(Path(base).absolute())
    opts = mergekit.merge.MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                                       quiet=True, lazy_unpickle=False)
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):  # mergekit's DARE draws from the global torch RNG
        if seed is not None:
            torch.manual_seed(seed)
        mergekit.merge.run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    random.setstate(py_state)
    return load_dir(out)


def run_ours(method: str, f: Fam, experts: list[Path], out: Path, params: dict[str, Any],
             per_expert: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """channelmerge K=1 (norms not folded); the dense view of the first expert."""
    cfg = parse_config({
        "base_model": str(f.base), "num_groups": 1, "method": method, "parameters": params,
        "fold_norms": False,
        "experts": [{"name": n, "model": str(p), "parameters": pe} for n, p, pe in zip(NAMES, experts, per_expert)],
    })
    merged = run_merge(cfg, out / "merged", progress=False)
    first = load_dir(extract_expert(merged, NAMES[0], out / "first"))
    last = load_dir(extract_expert(merged, NAMES[-1], out / "last"))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first), \
        "K=1: every expert sees the same model"
    return first


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    worst = max(diffs, key=diffs.__getitem__)
    return diffs[worst], worst


# -- same definition: same tensors --------------------------------------------------------------

# (ours, mergekit, our global parameters, mergekit's, per-expert parameters (both))
SAME = {
    "average": ("average", "linear", {}, {}, [{"weight": w} for w in WEIGHTS]),
    "task_arithmetic": ("task_arithmetic", "task_arithmetic", {"scale": 0.6}, {"lambda": 0.6},
                        [{"weight": w} for w in WEIGHTS]),
    "task_arithmetic_normalize": ("task_arithmetic", "task_arithmetic", {"scale": 0.6, "normalize": True},
                                  {"lambda": 0.6, "normalize": True}, [{"weight": w} for w in WEIGHTS]),
    "ties_density": ("ties", "ties", {"scale": 0.9, "density": 0.3}, {"lambda": 0.9, "density": 0.3},
                     [{"weight": w} for w in WEIGHTS]),
    "ties_per_expert": ("ties", "ties", {}, {},
                        [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)]),
}


@pytest.mark.parametrize("case", list(SAME))
def test_k1_equals_mergekit(fam, tmp_path, case):
    ours_m, mk_m, ours_p, mk_p, per = SAME[case]
    # mergekit `linear` averages whole weights and would average the base in too (it needs a
    # weight for it): list the experts only, which is our `average` (B + sum w tau / sum w).
    mk = run_mergekit(mk_m, None if mk_m == "linear" else fam.base, fam.experts, tmp_path / "mk", mk_p, per)
    ours = run_ours(ours_m, fam, fam.experts, tmp_path / "ours", ours_p, per)
    diff, worst = max_abs_diff(ours, mk)
    print(f"{case}: ours {ours_m} vs mergekit {mk_m}: max abs diff {diff:.3g} ({worst})")
    assert diff <= TOL, f"{case}: {worst} differs by {diff:.3g}"
    # Not a vacuous match: the merge moved every trained tensor away from the base (beyond the
    # tolerance) and kept the frozen one exactly.
    for k, b in fam.B.items():
        moved = float((ours[k] - b).abs().max())
        if FROZEN in k:
            assert moved == 0.0, k
        else:
            assert moved > 100 * TOL, k


# -- different definitions: each tool computes its own documented formula ------------------------


def _trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit `magnitude`: keep exactly the top int(density * numel) |x| (argsort order)."""
    if density >= 1.0:
        return d.clone()
    flat = d.reshape(-1)
    top = torch.argsort(flat.abs(), descending=True)[:max(1, int(density * flat.numel()))]
    out = torch.zeros_like(flat)
    out[top] = flat[top]
    return out.reshape(d.shape)


def _ties(base: torch.Tensor, experts: list[torch.Tensor], density: float, weights: tuple[float, ...],
          normalize: bool) -> torch.Tensor:
    """TIES written out: trim, elect the sign of sum w*trimmed (0 -> +), keep the agreeing
    entries; normalize: divide by the agreeing weights (ours always; mergekit's default)."""
    b = base.double()
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * b.dim()))
    t = torch.stack([_trim(e.double() - b, density) for e in experts]) * w
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
    agree = (torch.sign(t) == sign).to(torch.float64)
    out = (t * agree).sum(0)
    if normalize:
        div = (w * agree).sum(0)
        out = out / torch.where(div == 0, torch.ones_like(div), div)
    return b + out


def test_ties_normalize_false_is_mergekit_only(fam, tmp_path, caplog):
    """mergekit `ties` with `normalize: false` sums the agreeing entries (no division); ours always
    divides by the agreeing weights and ignores `normalize` for ties (with a warning)."""
    per = [{"weight": w} for w in WEIGHTS]
    mk = run_mergekit("ties", fam.base, fam.experts, tmp_path / "mk", {"density": 0.4, "normalize": False}, per)
    with caplog.at_level("WARNING", logger="merge_tool.config"):
        ours = run_ours("ties", fam, fam.experts, tmp_path / "ours", {"density": 0.4, "normalize": False}, per)
    assert "does not use parameters.normalize" in caplog.text
    checked = 0
    for k, b in fam.B.items():
        if FROZEN in k:
            continue
        ex = [e[k] for e in fam.E]
        ours_ref = _ties(b, ex, 0.4, WEIGHTS, normalize=True)
        mk_ref = _ties(b, ex, 0.4, WEIGHTS, normalize=False)
        assert float((ours[k].double() - ours_ref).abs().max()) <= TOL, k
        assert float((mk[k].double() - mk_ref).abs().max()) <= TOL, k
        checked += 1
    diff, _ = max_abs_diff(ours, mk)
    assert checked > 10 and diff > 1e-2  # the two definitions really differ


def test_mergekit_ties_default_density_is_one(fam, tmp_path):
    """Without `density`, mergekit's `ties` trims nothing (its default density is 1.0); ours
    defaults to 0.5. With `density: 1` written out, ours is mergekit's default."""
    per = [{"weight": 1.0} for _ in NAMES]
    mk = run_mergekit("ties", fam.base, fam.experts, tmp_path / "mk", {}, per)
    ours = run_ours("ties", fam, fam.experts, tmp_path / "ours", {"density": 1.0}, [{} for _ in NAMES])
    diff, worst = max_abs_diff(ours, mk)
    print(f"ties density 1 vs mergekit default: max abs diff {diff:.3g} ({worst})")
    assert diff <= TOL
    assert methods.PARAMS["density"].default == 0.5  # ours: a `ties` config without density trims half


def test_ties_trim_at_exact_ties_in_magnitude():
    """At a magnitude tied with the k-th largest, mergekit keeps exactly k entries (which of
    the tied ones: argsort's order); ours keeps every tied entry (deterministic, may keep more
    than k). It only matters where |tau| has exact repeats (bfloat16 checkpoints, say)."""
    d = torch.tensor([0.3, -0.2, 0.2, 0.2, -0.1, 0.05, 0.0, 0.2])
    density = 0.25  # k = 2: 0.3 and one of the four 0.2s
    mk = mk_magnitude(d, density)
    assert int(torch.count_nonzero(mk)) == 2 and float(mk[0]) == pytest.approx(0.3)
    thr = methods.magnitude_threshold(d, density)
    ours = methods.trim(d.view(1, 1, -1), [thr]).view(-1)
    assert thr == pytest.approx(0.2)
    assert torch.equal(ours, torch.where(d.abs() >= 0.2, d, torch.zeros_like(d)))
    assert int(torch.count_nonzero(ours)) == 5
    # without exact ties the two trims are the same (continuous float32 task vectors)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g)
    for dens in (0.1, 0.37, 0.5, 0.9):
        assert torch.equal(methods.trim(x.view(1, 1, -1), [methods.magnitude_threshold(x, dens)]).view(x.shape),
                           mk_magnitude(x, dens))


# -- DARE: random; keep rate and rescale compared statistically ----------------------------------

DARE_DENS = (0.3, 0.5, 0.8, 1.0)
DARE_SCALE = 0.7


def _disjoint_experts(f: Fam, root: Path) -> list[Path]:
    """Experts whose task vectors live on disjoint entries (entry i belongs to expert i % N), so
    that each merged entry shows whether that one expert's entry was kept, and by how much it
    was scaled."""
    n = len(f.experts)
    out = []
    for e, (src, st) in enumerate(zip(f.experts, f.E)):
        od = root / NAMES[e]
        od.mkdir(parents=True)
        for p in Path(src).iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
                shutil.copy(p, od / p.name)
        new = {}
        for k, b in f.B.items():
            mine = (torch.arange(b.numel()) % n == e).reshape(b.shape)
            new[k] = torch.where(mine, st[k], b).contiguous()
        save_file(new, str(od / "model.safetensors"), metadata={"format": "pt"})
        out.append(od)
    return out


def _dare_stats(f: Fam, experts: list[Path], merged: dict[str, torch.Tensor], scale: float):
    """Per expert: kept / total entries (|tau| > 1e-6) over all tensors, and per tensor the
    observed factors merged_delta / (scale * w * tau) of its kept entries (|tau| > 1e-3), with the
    L1 ratio ||tau||_1 / ||kept tau||_1."""
    n = len(experts)
    E = [load_dir(p) for p in experts]
    kept, total = [0] * n, [0] * n
    per_tensor: list[list[tuple[str, torch.Tensor, float, float, int]]] = [[] for _ in range(n)]
    for k, b in f.B.items():
        delta = (merged[k].double() - b.double()).reshape(-1)
        mine_idx = torch.arange(b.numel()) % n
        for e in range(n):
            tau = (E[e][k].double() - b.double()).reshape(-1)
            mine = (mine_idx == e) & (tau.abs() > 1e-6)
            if not bool(mine.any()):
                continue  # frozen: no task vector
            keep = mine & (delta != 0)
            kept[e] += int(keep.sum())
            total[e] += int(mine.sum())
            big = keep & (tau.abs() > 1e-3)
            factors = delta[big] / (scale * WEIGHTS[e] * tau[big])
            l1_ratio = float(tau[mine].abs().sum() / tau[keep].abs().sum())
            # std of the kept L1 mass / (p * total mass) under Bernoulli(p), given tau
            p = DARE_DENS[e]
            rel_sd = math.sqrt(p * (1 - p) * float((tau[mine] ** 2).sum())) / (p * float(tau[mine].abs().sum()))
            per_tensor[e].append((k, factors, l1_ratio, rel_sd, int(mine.sum())))
    return kept, total, per_tensor


def test_dare_keep_rate_and_rescale_vs_mergekit_dare_linear(fam, tmp_path):
    experts = _disjoint_experts(fam, tmp_path / "disjoint")
    per = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DARE_DENS)]
    mk = run_mergekit("dare_linear", fam.base, experts, tmp_path / "mk", {"lambda": DARE_SCALE}, per, seed=1234)
    ours = run_ours("dare", fam, experts, tmp_path / "ours", {"scale": DARE_SCALE, "seed": 1234}, per)

    mk_kept, mk_total, mk_tensors = _dare_stats(fam, experts, mk, DARE_SCALE)
    our_kept, our_total, our_tensors = _dare_stats(fam, experts, ours, DARE_SCALE)
    assert mk_total == our_total
    mk_off = []  # mergekit's per-tensor factor relative to 1/density
    for e, p in enumerate(DARE_DENS):
        n = our_total[e]
        sd = math.sqrt(p * (1 - p) / n)
        r_ours, r_mk = our_kept[e] / n, mk_kept[e] / n
        print(f"dare density {p}: keep rate ours {r_ours:.4f}, mergekit {r_mk:.4f} (n={n}, sd {sd:.4f})")
        if p == 1.0:  # nothing dropped, nothing rescaled, by either
            assert our_kept[e] == mk_kept[e] == n
        # keep rate: Bernoulli(density) in both, within 5 standard deviations
        assert abs(r_ours - p) <= 5 * sd + 1e-12 and abs(r_mk - p) <= 5 * sd + 1e-12
        assert abs(r_ours - r_mk) <= 5 * math.sqrt(2) * sd + 1e-12
        # rescale, ours: every kept entry exactly times 1/density (DARE paper)
        for k, factors, _, _, _ in our_tensors[e]:
            if factors.numel():
                assert torch.allclose(factors, torch.full_like(factors, 1 / p), rtol=1e-4, atol=0), k
        # rescale, mergekit (`rescale: true`): one factor per tensor, ||tau||_1 / ||kept tau||_1
        for k, factors, l1_ratio, rel_sd, count in mk_tensors[e]:
            if factors.numel():
                assert torch.allclose(factors, torch.full_like(factors, l1_ratio), rtol=1e-4, atol=0), k
            if p < 1.0 and count >= 5000:  # statistically about 1/density (6 sd)
                assert abs(l1_ratio * p - 1) <= 6 * rel_sd, (k, l1_ratio, 1 / p, rel_sd)
                mk_off.append(abs(l1_ratio * p - 1))
            elif p == 1.0:
                assert l1_ratio == 1.0
    # the documented difference: mergekit's factor is the L1 ratio, not exactly 1/density
    assert mk_off and max(mk_off) > 1e-3
    print(f"dare: mergekit's rescale factor off 1/density by up to {max(mk_off):.2%} (tensors >= 5000 entries)")
