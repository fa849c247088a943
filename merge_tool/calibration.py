"""Calibration activations for the data-aware budget criteria (`activation*`).

The error an extra row removes is measured on the layer's output, not its weights: for a
channel's merged row m and expert n's row w_n, ||(m - w_n) X^T||² over the inputs X the layer
sees on a few calibration texts (the output error of that channel, summed over tokens).

`collect` runs the base model (transformers, float32, on the merge device) over the texts once
and keeps, per channel-merged tensor, what that needs:

- a linear layer: its inputs X [T, in] (plus a column of ones when it has a bias, so the bias
  element of a row is measured the same way). Layers that read the same tensor (q/k/v,
  gate/up) share one copy.
- the token embedding: how often each token occurs (a lookup's output error is the looked-up
  row's error), and, when the lm_head is tied to it, the lm_head's inputs as well.

The inputs are kept as F with F^T F = X^T X and at most `in` rows, so that memory and the
merger's cost per channel are bounded by the layer's width whatever the number of tokens.

The base model is held in memory whole while the texts run (a 70B merge needs that memory for
this criterion; the weight criteria read shard by shard only).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Bad calibration input (file, texts, or a base model the texts cannot run through)."""


@dataclass
class Activations:
    """What one tensor's data-aware error needs (either part may be absent)."""

    inputs: Optional[torch.Tensor] = None  # [T, in'] float32: the layer's inputs (ones column for a bias)
    counts: Optional[torch.Tensor] = None  # [vocab] float32: token occurrences (an embedding)


@dataclass
class Calibration:
    """Per tensor name (as in the base checkpoint) its activations, and the tokens run."""

    tensors: dict[str, Activations] = field(default_factory=dict)
    tokens: int = 0
    texts: int = 0


def load_texts(path: str | Path) -> list[str]:
    """Calibration texts: JSON lines with a "text" field (`.jsonl`), else one text per non-empty
    line. Errors name the file and line."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{p}: calibration file not found") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise CalibrationError(f"{p}: cannot read: {e.strerror or e}") from None
    texts: list[str] = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise CalibrationError(f'{p}:{i}: each line must be an object with a non-empty "text" string')
            texts.append(obj["text"])
        else:
            texts.append(line)
    if not texts:
        raise CalibrationError(f"{p}: no calibration texts (the file is empty)")
    return texts


def collect(base_dir: str | Path, texts: list[str], max_tokens: int, wanted: set[str],
            device: torch.device) -> Calibration:
    """Run the base model over `texts` (in order, each truncated so that at most `max_tokens`
    tokens run in all) and record the activations of the tensors in `wanted`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                     local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{base_dir}: the activation criterion runs the base model with "
                               f"transformers and cannot load it: {' '.join(str(e).split())[:300]}") from None
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight keeps its first name
    rec = _Recorder()
    hooks = []
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        name = names.get(id(weight)) if isinstance(weight, torch.nn.Parameter) else None
        if name not in wanted:
            continue
        if isinstance(mod, torch.nn.Embedding):
            hooks.append(mod.register_forward_pre_hook(rec.embedding(name, mod.num_embeddings)))
        elif isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(rec.linear(name, mod.bias is not None)))
    cal = Calibration()
    try:
        with torch.no_grad():
            for text in texts:
                left = max_tokens - cal.tokens
                if left <= 0:
                    break
                ids = tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :left]
                if ids.shape[1] == 0:
                    continue
                model(input_ids=ids.to(device))
                rec.end_forward()
                cal.tokens += int(ids.shape[1])
                cal.texts += 1
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(wanted - rec.seen)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CalibrationError(f"{base_dir}: the base model run by transformers never used "
                               f"{', '.join(missing[:3])}{more}; the activation criterion needs every "
                               "channel-merged tensor's inputs (use a weight criterion)")
    cal.tensors = rec.result()
    log.info("calibration: %d texts, %d tokens through the base model; activations of %d tensors",
             cal.texts, cal.tokens, len(cal.tensors))
    return cal


class _Recorder:
    """Forward pre-hooks' state: inputs per tensor, shared where layers read the same tensor."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.inputs: dict[str, _Inputs] = {}
        self.alias: dict[str, str] = {}  # tensor -> the tensor whose inputs it shares
        self.counts: dict[str, torch.Tensor] = {}
        # this forward's inputs, held so that no address is reused while the forward runs
        self._step: dict[tuple[int, tuple[int, ...], bool], tuple[str, torch.Tensor]] = {}

    def linear(self, name: str, bias: bool) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            self.seen.add(name)
            first = self._step.setdefault((x.data_ptr(), tuple(x.shape), bias), (name, x))[0]
            if first != name:
                self.alias.setdefault(name, first)
                return
            if name in self.alias:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float().cpu()
            if bias:
                flat = torch.cat([flat, torch.ones(flat.shape[0], 1)], 1)
            self.inputs.setdefault(name, _Inputs()).add(flat)
        return hook

    def embedding(self, name: str, vocab: int) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            self.seen.add(name)
            ids = args[0].detach().reshape(-1).cpu()
            c = self.counts.setdefault(name, torch.zeros(vocab))
            c += torch.bincount(ids, minlength=vocab)[:vocab].float()
        return hook

    def end_forward(self) -> None:
        self._step.clear()

    def result(self) -> dict[str, Activations]:
        factors = {n: acc.factor() for n, acc in self.inputs.items()}
        return {n: Activations(factors.get(self.alias.get(n, n)), self.counts.get(n)) for n in self.seen}


class _Inputs:
    """A layer's inputs X, kept as rows while there are fewer rows than columns and as the
    Gram matrix X^T X (float64) after that, so memory stays bounded by the layer's width."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.gram: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        if self.gram is None:
            self.rows.append(x)
            if sum(r.shape[0] for r in self.rows) <= x.shape[1]:
                return
            x = torch.cat(self.rows)
            self.rows = []
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.gram += x.double().T @ x.double()

    def factor(self) -> torch.Tensor:
        """F [min(T, in'), in'] with F^T F = X^T X: X itself while it is the smaller, else the
        square root of X^T X (eigendecomposition)."""
        if self.gram is None:
            return torch.cat(self.rows)
        lam, vec = torch.linalg.eigh(self.gram)
        return (vec * lam.clamp_min(0).sqrt()).T.float().contiguous()


def output_error(r: torch.Tensor, inputs: Optional[torch.Tensor], counts: Optional[torch.Tensor]) -> torch.Tensor:
    """Per channel, the output error of rows off by `r` [R, N, I'], summed over experts and
    calibration tokens: ||r_n F^T||² for a layer's inputs F [M, I'], plus count x ||r_n||² for
    a token embedding's lookups (`counts` [R]: the block's channels). [R] float64."""
    rr, n, width = r.shape
    e = torch.zeros(rr, dtype=torch.float64, device=r.device)
    if inputs is not None:
        e += (r.reshape(rr * n, width) @ inputs.T).square().sum(1).view(rr, n).sum(1).double()
    if counts is not None:
        e += counts.double() * r.square().sum((1, 2)).double()
    return e
