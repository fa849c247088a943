"""K=1 ``channelmerge merge`` against ``mergekit-yaml`` on the four real experts.

    python -m benchmarks.quality.mergekit_check

For average (mergekit ``linear``), task arithmetic and TIES, both command-line tools run on
the same base and experts with the same parameters (``fold_norms: false`` on our side, which is
mergekit's definition: docs/merge-config.md, "Compared with mergekit"); our merge is read as
one expert's dense model through ``channelmerge extract`` and every tensor is compared in
float64; where TIES differs, each differing entry is checked to be an exact tie with an
expert's trim threshold (the documented difference). Writes ``mergekit_check.json`` beside
this file. DARE is random and is compared statistically by
``tests/test_mergekit_crosscheck.py`` instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from merge_tool.io import ModelReader

from .base_model import BASE_DIR, EXPERTS_DIR
from .evaluate import machine_info
from .tasks import TASKS

OUT_JSON = Path(__file__).with_name("mergekit_check.json")
WORK = Path("work/mergekit_check")
BIN = Path(sys.executable).parent
TOL = 1e-5

# name -> (our method, our parameters, mergekit method, mergekit parameters); weight 1 each
CASES: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "average": ("average", {}, "linear", {}),
    "task_arithmetic": ("task_arithmetic", {"scale": 0.5}, "task_arithmetic", {"lambda": 0.5}),
    "ties": ("ties", {"density": 0.5, "scale": 1.0}, "ties", {"density": 0.5, "lambda": 1.0, "normalize": True}),
}


def timed(cmd: list[str]) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - t0, 1)


def compare(ours_dir: Path, theirs_dir: Path, ties_density: float | None) -> dict[str, Any]:
    """Every tensor of the two merges compared in float64, one tensor in memory at a time.

    With `ties_density`, also where the TIES merges differ and how many of those entries are exact
    ties with an expert's trim threshold: both keep k = max(1, int(density * numel)) entries of
    |tau| by magnitude, but mergekit keeps exactly k (an argsort picks among equal magnitudes) and
    ours every entry >= the k-th (docs/merge-config.md). TIES is elementwise after trimming, so an
    entry can only differ where the kept sets differ."""
    ours, theirs = ModelReader(ours_dir, "channelmerge"), ModelReader(theirs_dir, "mergekit")
    if set(ours.names) != set(theirs.names):
        raise SystemExit(f"{ours_dir} vs {theirs_dir}: tensor names differ: "
                         f"{sorted(set(ours.names) ^ set(theirs.names))[:5]}")
    base = ModelReader(BASE_DIR, "base")
    experts = [ModelReader(EXPERTS_DIR / t, t) for t in TASKS]
    diffs: dict[str, float] = {}
    differ = at_tie = entries = 0
    for k in sorted(ours.names):
        a, b = ours.get(k).double(), theirs.get(k).double()
        diff = (a - b).abs()
        diffs[k], entries = float(diff.max()), entries + a.numel()
        if ties_density is None or diffs[k] == 0:
            continue
        tie = torch.zeros(a.shape, dtype=torch.bool)
        base_k = base.get(k).double()
        for e in experts:
            mag = (e.get(k).double() - base_k).abs()
            thr = torch.topk(mag.flatten(), max(1, int(ties_density * mag.numel()))).values[-1]
            tie |= mag == thr
        differ += int((diff > 0).sum())
        at_tie += int(((diff > 0) & tie).sum())
    worst = max(diffs, key=diffs.__getitem__)
    out: dict[str, Any] = {"tensors": len(diffs), "max_abs_diff": diffs[worst], "worst_tensor": worst,
                           "bit_identical_tensors": sum(v == 0 for v in diffs.values()),
                           "within_tol": diffs[worst] <= TOL}
    if ties_density is not None:
        out.update(differing_entries=differ, differing_at_threshold_ties=at_tie, entries=entries)
    return out


def run_case(name: str) -> dict[str, Any]:
    ours_m, ours_p, mk_m, mk_p = CASES[name]
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    experts = {t: (EXPERTS_DIR / t).absolute() for t in TASKS}
    ours_cfg = {"base_model": str(BASE_DIR.absolute()), "num_groups": 1, "method": ours_m,
                "parameters": ours_p, "fold_norms": False,
                "experts": [{"name": t, "model": str(p)} for t, p in experts.items()]}
    mk_cfg: dict[str, Any] = {"merge_method": mk_m, "dtype": "float32", "parameters": mk_p,
                              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in experts.values()]}
    if mk_m != "linear":  # mergekit's linear would average the base in as one more model
        mk_cfg["base_model"] = str(BASE_DIR.absolute())
    (d / "ours.yml").write_text(yaml.safe_dump(ours_cfg))
    (d / "mergekit.yml").write_text(yaml.safe_dump(mk_cfg))
    t_ours = timed([str(BIN / "channelmerge"), "merge", "-q", str(d / "ours.yml"), str(d / "merged")])
    timed([str(BIN / "channelmerge"), "extract", str(d / "merged"), TASKS[0], str(d / "dense")])
    t_mk = timed([str(BIN / "mergekit-yaml"), str(d / "mergekit.yml"), str((d / "mergekit").absolute()),
                  "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--no-cuda"])
    res = compare(d / "dense", d / "mergekit", ours_p["density"] if ours_m == "ties" else None)
    for sub in ("merged", "dense", "mergekit"):  # ~0.5 GB each; the configs stay
        shutil.rmtree(d / sub)
    return {**res, "ours": {"method": ours_m, "parameters": ours_p}, "mergekit": {"method": mk_m, "parameters": mk_p},
            "seconds": {"channelmerge": t_ours, "mergekit": t_mk}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    a = ap.parse_args(argv)
    res = {"experts": list(TASKS), "dtype": "float32", "tolerance": TOL, "machine": machine_info(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python -m benchmarks.quality.mergekit_check", "cases": {}}
    for c in a.cases:
        res["cases"][c] = r = run_case(c)
        print(f"{c}: max |ours - mergekit| = {r['max_abs_diff']:.3g} ({r['worst_tensor']}), "
              f"{r['bit_identical_tensors']}/{r['tensors']} tensors bit-identical"
              + (f", {r['differing_entries']} entries differ, {r['differing_at_threshold_ties']} of them at "
                 f"trim-threshold ties" if "differing_entries" in r else ""), flush=True)
    OUT_JSON.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT_JSON}")
    explained = all(r["within_tol"] or r.get("differing_entries", -1) == r.get("differing_at_threshold_ties")
                    for r in res["cases"].values())
    return 0 if explained else 1


if __name__ == "__main__":
    sys.exit(main())
