"""`channelmerge inspect`: what a channel-merged checkpoint holds, as a table or JSON.

Reads only config.json, the index and the sidecar report (no weights), so it is instant on
any size of checkpoint. Per tensor: K, mean/max relative reconstruction error over experts,
and the fraction of channels where each expert is outside group 0 (what the runtime's
majority-group strategy pays for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_channelmerge import format as fmt


def _shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (cheap: headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in fmt.checkpoint_shards(str(d)):
        for k, v in fmt.read_safetensors_header(f).items():
            if k != "__metadata__":
                shapes[k] = tuple(v["shape"])
    return shapes


def inspect_checkpoint(merged_dir: str | Path) -> dict[str, Any]:
    """Summary of a merged checkpoint as a JSON-able dict."""
    d = Path(merged_dir)
    qc = fmt.read_checkpoint_config(d)
    rp = d / fmt.REPORT_FILE
    report = json.loads(rp.read_text()) if rp.exists() else {}
    shapes = _shapes(d)
    stored = fmt.stored_params(shapes)
    params = report.get("params", {})
    base_params = params.get("base")
    tensors = []
    for name, t in report.get("tensors", {}).items():
        row: dict[str, Any] = {"tensor": name, "kind": t["kind"], "shape": t.get("shape")}
        if t["kind"] == "channel":
            errs = list(t["rel_error"].values())
            row.update(num_groups=t["num_groups"], channel_merged=t.get("channel_merged", True),
                       folded_norm=t.get("folded_norm"), bias=t.get("bias", False),
                       rel_error_mean=sum(errs) / len(errs), rel_error_max=max(errs),
                       rel_error=t["rel_error"], outside_group0=t["outside_group0"])
            if qc.row_table:  # format v2: stored rows (R), from the shard headers
                rows = shapes.get(name, (None,))[0]
                row.update(rows=rows, extra_rows=qc.extra_rows.get(fmt.module_of(name), 0),
                           rows_per_channel=t.get("rows_per_channel"), error_removed=t.get("error_removed"))
        elif t["kind"] == "merged":
            errs = list(t["rel_error"].values())
            row.update(num_groups=1, rel_error_mean=sum(errs) / len(errs), rel_error_max=max(errs),
                       rel_error=t["rel_error"])
        tensors.append(row)
    notes = []
    for n in report.get("identical_tensors", []):
        notes.append(f"{n} is identical in every expert: stored once (K=1)")
    merged_norms = report.get("merged_norms", [])
    for n in merged_norms:
        notes.append(f"norm {n} merged across experts ({report.get('fold_note') or 'not folded'})")
    return {
        "path": str(d),
        "format_version": qc.format_version,
        "architecture": fmt.WRAPPER_ARCHITECTURES.get(qc.base_architecture, "?"),
        "base_architecture": qc.base_architecture,
        "experts": qc.experts,
        "num_groups": qc.num_groups,
        "num_groups_overrides": qc.num_groups_overrides,
        "method": qc.method,
        "parameters": report.get("parameters"),
        "similarity": qc.similarity,
        "folded_norms": qc.folded_norms,
        "merged_norms": merged_norms,
        "expert_norms": qc.expert_norms,
        "identical_tensors": report.get("identical_tensors", []),
        "params_stored": stored,
        "params_ensemble": (base_params or 0) * len(qc.experts) or None,
        "params_ratio": stored / (base_params * len(qc.experts)) if base_params else None,
        "extra_rows": qc.extra_rows,
        "budget": qc.budget if qc.row_table else None,
        "budget_report": report.get("budget"),
        "allocation": report.get("allocation"),
        "notes": notes,
        "tensors": tensors,
    }


def format_table(info: dict[str, Any]) -> str:
    """Human-readable report of `inspect_checkpoint`."""
    lines = [
        f"{info['path']}  (format v{info['format_version']}, {info['architecture']})",
        f"experts ({len(info['experts'])}): {', '.join(info['experts'])}",
        f"K={info['num_groups']}  method={info['method']}  similarity={info['similarity']}"
        + (f"  overrides={info['num_groups_overrides']}" if info["num_groups_overrides"] else ""),
    ]
    if info["params_ratio"] is not None:
        lines.append(f"parameters: {info['params_stored']:,} stored = {info['params_ratio']:.3f} of the "
                     f"ensemble ({info['params_ensemble']:,})")
    lines.append(f"norms folded: {len(info['folded_norms'])}; merged across experts: {len(info['merged_norms'])}; "
                 f"kept per expert: {len(info['expert_norms'])}")
    for n in info["notes"]:
        lines.append(f"note: {n}")
    v2 = info["format_version"] == fmt.ROW_TABLE_VERSION
    if v2:
        lines += _budget_lines(info)
    names = info["experts"]
    where = "primary row" if v2 else "group 0"
    rows_head = f" {'rows':>7}" if v2 else ""
    head = f"{'tensor':<48} {'K':>2}{rows_head} {'err mean':>9} {'err max':>8}  outside {where} ({' '.join(names)})"
    lines += ["", head, "-" * len(head)]
    blank = f" {'':>7}" if v2 else ""
    for t in info["tensors"]:
        if t["kind"] == "channel":
            og = " ".join(f"{t['outside_group0'][n]:.0%}" for n in names)
            flag = "" if t.get("channel_merged", True) else " (excluded)"
            rows = f" {t.get('rows') or '?':>7}" if v2 else ""
            lines.append(f"{t['tensor']:<48} {t['num_groups']:>2}{rows} {t['rel_error_mean']:>9.4f} "
                         f"{t['rel_error_max']:>8.4f}  {og}{flag}")
        elif t["kind"] == "merged":
            lines.append(f"{t['tensor']:<48} {'-':>2}{blank} {t['rel_error_mean']:>9.4f} {t['rel_error_max']:>8.4f}  "
                         "merged across experts")
        elif t["kind"] == "folded_norm":
            lines.append(f"{t['tensor']:<48} {'-':>2}{blank} {'':>9} {'':>8}  folded (stored as ones)")
        elif t["kind"] == "expert_norm":
            lines.append(f"{t['tensor']:<48} {'-':>2}{blank} {'':>9} {'':>8}  kept per expert (exact)")
    lines.append("")
    lines.append("err = ||stored - expert|| / ||expert - base|| per tensor (0: exact; 1: as far as the base)")
    if v2:
        lines.append("rows = R, rows stored (one primary row per channel, then the extra rows); K = the most "
                     "rows a channel may have")
    return "\n".join(lines)


def _budget_lines(info: dict[str, Any]) -> list[str]:
    """Format v2: the budget asked for and met, and the allocation tables of report.json."""
    b = info.get("budget_report") or info.get("budget") or {}
    asked = (f"params_ratio {b['params_ratio']}" if "params_ratio" in b
             else f"{b['bytes']:,} bytes" if "bytes" in b else "?")
    extra = sum(info["extra_rows"].values())
    lines = [f"memory budget (format v2, row table): {asked}, criterion {b.get('criterion', '?')}; "
             f"{extra:,} extra rows in {len(info['extra_rows'])} tensors"]
    if "achieved_ratio" in b:
        removed = b.get("error_removed")
        lines.append(f"achieved: {b['achieved_ratio']:.4f} of the ensemble's parameters"
                     + (f" ({b['achieved_bytes']:,} bytes)" if "achieved_bytes" in b else "")
                     + (f"; error removed {100 * removed:.1f}% of what K rows everywhere remove"
                        if removed is not None else ""))
    alloc = info.get("allocation")
    if alloc:
        from merge_tool.budget import format_summary  # only for v2 tables (imports torch)

        cap = max([len(r["rows"]) for r in alloc["by_kind"]] + [1])
        lines += ["", *format_summary(alloc["by_kind"], "kind", cap), "",
                  *format_summary(alloc["by_layer"], "layer", cap)]
    return lines


def main_json(merged_dir: str | Path) -> str:
    return json.dumps(inspect_checkpoint(merged_dir), indent=1)
