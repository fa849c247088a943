"""Extract one expert of a channel-merged checkpoint as a plain dense HF checkpoint.

The result loads in stock `transformers` and stock vLLM: each channel's row is looked up in
the expert's group, folded norms are unfolded back (divide the columns by the expert's
original norm weight, kept in the sidecar) where that is exact (no zero in the norm), an
expert norm becomes that expert's row of ``<norm>.expert_weight``, the original architecture
is restored and `quantization_config` dropped. It is what the merged checkpoint computes for
that expert, so it is the reference for the runtime's tests.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from merge_tool import fold as foldmod
from merge_tool.io import (EXTRACT_MARKER, ModelReader, PlannedTensor, StreamingShardWriter,
                           check_not_overlapping, check_replaceable, copy_tokenizer_files,
                           extract_output_problem, staged_dir)
from vllm_channelmerge import format as fmt, rowtable

log = logging.getLogger(__name__)


def _read_report(d: Path) -> dict[str, Any]:
    p = d / fmt.REPORT_FILE
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise fmt.FormatError(f"{p}: not valid JSON: {e}") from None


def extract_expert(merged_dir: str | Path, name: str, out_dir: str | Path, force: bool = False,
                   unfold_norms: bool = True, max_shard_size: int = 5 * 10**9) -> Path:
    """Write expert `name` of `merged_dir` as a dense HF checkpoint at `out_dir`; returns it.

    Refuses an existing `out_dir` unless `force`, and even then replaces only an expert that
    `extract` wrote before (config.json key `channelmerge_extract`) or an empty folder; never
    the merged checkpoint, a folder holding it, or one inside it. Leaves nothing behind on error.
    """
    src = Path(merged_dir)
    given = Path(out_dir).expanduser().absolute()
    check_not_overlapping(given, [("the merged checkpoint", src.expanduser().absolute())], FileExistsError)
    out = Path(os.path.realpath(given))
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{given} already exists; pass force=True (--force) to overwrite it")
        check_replaceable(out, extract_output_problem)
    reader = ModelReader(src, "merged checkpoint")
    qc = fmt.read_quant_config(reader.config, str(src / fmt.CONFIG_FILE))
    fmt.check_checkpoint_experts(str(src), qc.experts)  # a reordered list would extract another expert
    e = qc.expert_id(name)
    report = _read_report(src)
    # folded_norms lists modules (`model.norm`); the tensors are their `.weight`
    folded = [n if n.endswith(".weight") else n + ".weight" for n in qc.folded_norms]
    norms: dict[str, torch.Tensor] = {}
    if folded:
        nf = src / fmt.NORMS_FILE
        if not nf.exists():
            raise fmt.FormatError(f"{nf}: missing; it holds the folded norms needed to extract an expert")
        from safetensors.torch import load_file
        side = load_file(str(nf))
        for nn in folded:
            if nn not in side or side[nn].dim() != 2 or side[nn].shape[0] != qc.num_experts:
                raise fmt.FormatError(f"{nf}: tensor {nn!r} is missing or not [{qc.num_experts}, hidden]")
            norms[nn] = side[nn][e]
    # Which weight has which norm folded into it (recorded by the merge; recomputed if absent).
    targets: dict[str, str] = report.get("fold_targets") or foldmod.plan_folding(
        qc.base_architecture, [n for n in reader.names if not n.endswith(fmt.INDEX_SUFFIXES)], True).targets
    targets = {t: n for t, n in targets.items() if n in folded}
    unfold_ok = {nn: unfold_norms and foldmod.can_unfold(g) for nn, g in norms.items()}
    for nn, ok in unfold_ok.items():
        if unfold_norms and not ok:
            log.warning("%s of %s has zeros: kept folded (norm stored as ones)", nn, name)

    for m in qc.expert_norms:
        en = fmt.expert_norm_name(m)
        if not reader.has(en):
            raise fmt.FormatError(f"{src}: tensor {en!r} is missing (quantization_config.expert_norms lists {m!r})")
        w = reader.get(en)
        if w.dim() != 2 or w.shape[0] != qc.num_experts:
            raise fmt.FormatError(f"{reader.file_of(en)}: tensor {en!r} has shape {list(w.shape)}; "
                                  f"expected [{qc.num_experts}, hidden]")
        norms[m + ".weight"] = w[e]
    names = [n for n in reader.names if not n.endswith((*fmt.INDEX_SUFFIXES, fmt.EXPERT_WEIGHT_SUFFIX))]
    planned = []
    for n in names:
        shape = reader.shape(n)
        if fmt.is_channel_tensor(n) and reader.has(fmt.group_index_name(n)):
            shape = shape[1:]
        elif fmt.is_channel_tensor(n) and reader.has(fmt.row_index_name(n)):
            shape = (reader.shape(fmt.row_index_name(n))[1], *shape[1:])  # [R, ...] -> [out, ...]
        planned.append(PlannedTensor(n, reader.dtype(n), tuple(shape)))

    cfg = dict(reader.config)
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [qc.base_architecture]
    was_tied = bool(report.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    retie = was_tied and foldmod.FINAL_NORM not in folded and foldmod.LM_HEAD in names
    if retie:
        planned = [p for p in planned if p.name != foldmod.LM_HEAD]
    cfg["tie_word_embeddings"] = was_tied and foldmod.FINAL_NORM not in folded
    # Marks the folder as extract's own output: what `extract --force` may replace.
    cfg[EXTRACT_MARKER] = {"expert": name, "merged_checkpoint": str(src.expanduser().absolute())}

    try:
        with staged_dir(out, force=force, own=extract_output_problem) as tmp:
            writer = StreamingShardWriter(tmp, planned, max_shard_size)
            try:
                for p in planned:
                    writer.write(p.name, _dense(reader, p.name, e, targets, norms, unfold_ok))
                writer.close()
            finally:
                writer.abort()
            (tmp / fmt.CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
            copy_tokenizer_files(src, tmp)
            (tmp / fmt.MODEL_CARD_FILE).write_text(
                f"# Expert `{name}`\n\nExtracted with `channelmerge extract` from the channel-merged "
                f"checkpoint `{src}` (K={qc.num_groups}, method `{qc.method}`"
                f"{', format v2' if qc.row_table else ''}). A plain "
                f"`{qc.base_architecture}` checkpoint.\n")
    finally:
        reader.close()
    return given


def _dense(reader: ModelReader, n: str, e: int, targets: dict[str, str], norms: dict[str, torch.Tensor],
           unfold_ok: dict[str, bool]) -> torch.Tensor:
    """One tensor of expert `e`: group (v1) or row (v2) lookup per channel, then unfold /
    restore norms."""
    t = reader.get(n)
    gi_name, ri_name = fmt.group_index_name(n), fmt.row_index_name(n)
    if fmt.is_channel_tensor(n) and reader.has(ri_name):
        idx = reader.get(ri_name)
        try:
            rowtable.check_row_index(ri_name, idx, t.shape[0])
        except fmt.FormatError as err:
            raise fmt.FormatError(f"{reader.file_of(ri_name)}: {err}") from None
        if idx.shape[0] <= e:
            raise fmt.FormatError(f"{reader.file_of(ri_name)}: checkpoint tensor {ri_name!r} has "
                                  f"{idx.shape[0]} rows (experts); expert {e} is missing")
        t = rowtable.lookup(t, idx, e)
    elif fmt.is_channel_tensor(n) and reader.has(gi_name):
        idx = reader.get(gi_name)
        if idx.shape[0] <= e or idx.shape[1] != t.shape[1]:
            raise fmt.FormatError(f"{reader.file_of(gi_name)}: {gi_name} has shape {list(idx.shape)}, "
                                  f"inconsistent with {n} {list(t.shape)}")
        row = idx[e].long()
        if bool((row < 0).any()) or bool((row >= t.shape[0]).any()):
            raise fmt.FormatError(f"{reader.file_of(gi_name)}: {gi_name} has values outside [0, {t.shape[0]})")
        t = t[row, torch.arange(t.shape[1])]
    if n in targets and unfold_ok.get(targets[n]) and n.endswith(".weight"):
        t = foldmod.unfold(t.float(), norms[targets[n]].float()).to(t.dtype)
    elif n in norms and unfold_ok.get(n, True):  # folded norm restored, or an expert norm
        t = norms[n].to(t.dtype)
    return t.contiguous()
