"""In-group merge methods as data: one class per method, one registry (`METHODS`).

A method is read by three parties, so it is declared once, here (mergekit's shape):

- the config (`merge_tool.config`) takes the allowed method names and, per method, which
  global parameters (`parameters:`) and per-expert parameters (`experts[i].parameters`:
  `weight`, `density`) it reads; a parameter the method does not read is ignored with a
  warning (as mergekit ignores it);
- the merge (`merge_tool.merge`) calls the method's `sparsifier` and `combine` /
  `coefficients`;
- the docs table (docs/merge-config.md) and the CLI help are generated from it
  (`markdown_tables`, `help_text`); a test keeps the docs in step.

A method has two steps, so that grouping never changes what a method means:

1. sparsification acts on each expert's task vector of a *whole tensor* (TIES trims each
   task vector to its top-`density` magnitudes; DARE drops entries at random and rescales by
   1/density). It does not depend on the grouping, exactly as in mergekit, so K=1 is the
   classic whole-model merge.
2. `combine` merges, for every channel (row) at once, the rows of the experts that are in
   one group: `deltas` is `[N, R, I]`, `members` is `[R, N]` bool, the result `[R, I]` is
   the merged task vector of that group (added to the base by the caller). A *linear* method
   also gives `coefficients` (a weighted sum of the members), which the merge computes for
   all groups of all channels with one batched matmul; `combine` stays the reference.

Formulas (tau_n = W_n - B, w_n = the expert's `weight`, lambda = `scale`, sums over the
members of one group):
- average:          sum w_n tau_n / sum w_n            (= plain weight averaging at w = 1;
                                                        mergekit `linear`)
- task_arithmetic:  lambda * sum w_n tau_n             (Ilharco et al. 2023); with
                    `normalize`, divided by sum w_n (mergekit's option)
- ties:             trim each tau_n to its top-density |.| per tensor; gamma = sign(sum w_n
                    trimmed_n) (0 counts as +); sum of the agreeing w_n trimmed_n / sum of
                    their w_n; times lambda            (Yadav et al. 2023; mergekit `ties`)
- dare:             tau_n * Bernoulli(density_n) / density_n, then as task_arithmetic
                    (Yu et al. 2024; mergekit `dare_linear`)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

# -- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, its type/range (for the docs) and what it does.

    `per_expert`: may also be given per expert (`experts[i].parameters`), where it overrides
    the global value for that expert, as in mergekit.
    """

    name: str
    default: Any
    type: str
    doc: str
    per_expert: bool = False


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("scale", 1.0, "float in [-1000, 1000]",
          "λ (alias `lambda`): the merged task vector is multiplied by it. Task vectors are small; "
          "a larger scale only overflows the stored dtype"),
    Param("normalize", False, "bool",
          "divide the group's weighted sum by the sum of its members' weights (mergekit's `normalize`). "
          "Without it, a group of m alike experts gets about m × their task vector at `scale: 1`: "
          "use `normalize: true` or a `scale` near 1/m"),
    Param("density", 0.5, "float in (0, 1]",
          "fraction of each task vector kept (`ties`: its top magnitudes, as mergekit's `magnitude`; "
          "`dare`: at random, the kept entries rescaled by 1/density)", per_expert=True),
    Param("seed", 0, "int >= 0",
          "seed of DARE's drop mask (a counter-based hash of seed, tensor, expert and position: the "
          "same seed gives the same checkpoint on any machine, device or block size)"),
    Param("weight", 1.0, "float in (0, 1000]",
          "the expert's weight inside its group. It only acts in groups of two or more: a group with "
          "one member keeps that expert's weights exactly", per_expert=True),
)}


@dataclass(frozen=True)
class MergeParams:
    """The resolved parameters of one merge (per-expert values already filled in).

    `weights` / `densities`: one per expert in expert order; None means every expert has the
    global value (weight 1, `density`). Built by `MergeConfig.merge_params()`.
    """

    scale: float = 1.0
    normalize: bool = False
    seed: int = 0
    density: float = 0.5
    weights: Optional[tuple[float, ...]] = None
    densities: Optional[tuple[float, ...]] = None

    def unit_weights(self) -> bool:
        return self.weights is None or all(w == 1.0 for w in self.weights)

    def weight_vector(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[N] expert weights (ones when none are given)."""
        if self.weights is None:
            return torch.ones(n, dtype=dtype, device=device)
        if len(self.weights) != n:
            raise ValueError(f"{len(self.weights)} expert weights for {n} experts")
        return torch.tensor(self.weights, dtype=dtype, device=device)

    def density_list(self, n: int) -> list[float]:
        if self.densities is None:
            return [self.density] * n
        if len(self.densities) != n:
            raise ValueError(f"{len(self.densities)} expert densities for {n} experts")
        return list(self.densities)


# -- sparsification: whole-tensor, per expert, independent of the grouping -----------------------


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """|x| threshold keeping the top `density` fraction of one expert's task vector.

    k = int(density * numel) entries are kept, as in mergekit's `magnitude` (at least 1).
    Entries equal to the threshold are all kept (only matters for exact ties). Exact: a
    strided sample brackets the k-th largest value, and only the entries inside that band
    are selected from (a full selection over the whole tensor is ~10x slower).
    """
    if density >= 1.0:
        return 0.0
    flat = delta.reshape(-1).abs().float()
    n = flat.numel()
    k = max(1, int(density * n))
    pos = n - k + 1  # 1-based rank from the smallest
    if n > 1 << 16:
        sample = flat[:: max(1, n // 16384)].sort().values
        q = pos / n
        m = sample.numel() - 1
        lo = float(sample[max(0, int((q - 0.02) * m))])
        hi = float(sample[min(m, int((q + 0.02) * m) + 1)])
        below = int(torch.count_nonzero(flat < lo))
        band = flat[(flat >= lo) & (flat <= hi)]
        if below < pos <= below + band.numel():
            return float(torch.kthvalue(band.cpu(), pos - below).values)
    return float(torch.kthvalue(flat.cpu(), pos).values)


def trim(d: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """TIES 'trim' of a block `[R, N, I]`: zero each expert's entries below its threshold."""
    thr = torch.tensor(list(thresholds), dtype=d.dtype, device=d.device).view(1, -1, 1)
    return d * (d.abs() >= thr).to(d.dtype)


def dare_key(seed: int, tensor_name: str, expert_index: int) -> int:
    """A 63-bit key for one (seed, tensor, expert): DARE masks are reproducible anywhere."""
    h = hashlib.blake2b(f"{seed}/{tensor_name}/{expert_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor, s: int, mult: Optional[int]) -> torch.Tensor:
    """In place: z ^= z >>> s, then z *= mult (wrapping int64)."""
    z.bitwise_xor_(torch.bitwise_right_shift(z, s).bitwise_and_((1 << (64 - s)) - 1))
    if mult is not None:
        z.mul_(mult)
    return z


def _splitmix(key: int, flat_index: torch.Tensor) -> torch.Tensor:
    """splitmix64(key + (index + 1) * golden) as int64 bits, computed in place."""
    z = flat_index.to(torch.int64) * _i64(0x9E3779B97F4A7C15)
    z.add_(_i64(key + 0x9E3779B97F4A7C15))
    _mix_(z, 30, _i64(0xBF58476D1CE4E5B9))
    _mix_(z, 27, _i64(0x94D049BB133111EB))
    return _mix_(z, 31, None)


def uniform_hash(key: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): splitmix64(key + index). Same on CPU and CUDA, and
    independent of how a tensor is split into blocks."""
    return _srl(_splitmix(key, flat_index), 11).to(torch.float64) * (1.0 / (1 << 53))


def dare_keep_mask(key: int, flat_index: torch.Tensor, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask of the entries at `flat_index` of one expert's tensor.

    Equal to `uniform_hash(key, flat_index) < density`, compared on the 53-bit integers.
    """
    return _srl(_splitmix(key, flat_index), 11) < math.ceil(density * (1 << 53))


def block_flat_index(rows: int, cols: int, flat0: int, row_len: int, device: torch.device) -> torch.Tensor:
    """[R, I] positions in the whole tensor of a block of `rows` rows starting at `flat0`."""
    return (flat0 + torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1) * row_len
            + torch.arange(cols, device=device, dtype=torch.int64).unsqueeze(0))


def dare_drop(d: torch.Tensor, keys: Sequence[int], flat_index: torch.Tensor,
              densities: Sequence[float]) -> torch.Tensor:
    """DARE on a block `[R, N, I]`: expert n's entry at `flat_index` [R, I] is kept with
    probability densities[n] (its mask from keys[n]) and rescaled by 1/densities[n]."""
    dens = list(densities)
    if all(x >= 1.0 for x in dens):
        return d
    keep = torch.stack([dare_keep_mask(k, flat_index, x) for k, x in zip(keys, dens)], 1)
    if len(set(dens)) == 1:
        return d * keep.to(d.dtype) / dens[0]
    return d * keep.to(d.dtype) / torch.tensor(dens, dtype=d.dtype, device=d.device).view(1, -1, 1)


@dataclass(frozen=True)
class Block:
    """Where a block `[R, N, I]` of task-vector rows lies in its tensor: DARE's masks are
    keyed by tensor name and position, so that they do not depend on the block size."""

    tensor: str
    flat0: int  # position of the block's first entry in the flattened tensor
    row_len: int  # entries per row of the tensor


class Sparsifier:
    """Whole-tensor sparsification of each expert's task vector.

    `needs_stats`: the merge first passes over each expert's whole (folded) task vector and
    calls `stat` (TIES's magnitude threshold); `apply` then sees one row block at a time.
    """

    name: ClassVar[str]
    needs_stats: ClassVar[bool] = False

    def stat(self, delta: torch.Tensor, density: float) -> float:
        raise NotImplementedError

    def apply(self, d: torch.Tensor, block: Block, stats: Sequence[float], p: MergeParams) -> torch.Tensor:
        raise NotImplementedError


class Magnitude(Sparsifier):
    """TIES: keep each expert's top `density` fraction by magnitude (mergekit `magnitude`)."""

    name = "magnitude"
    needs_stats = True

    def stat(self, delta: torch.Tensor, density: float) -> float:
        return magnitude_threshold(delta, density)

    def apply(self, d: torch.Tensor, block: Block, stats: Sequence[float], p: MergeParams) -> torch.Tensor:
        if all(x >= 1.0 for x in p.density_list(d.shape[1])):
            return d
        return trim(d, stats)


class RandomDrop(Sparsifier):
    """DARE: drop at random (counter-based, seeded), rescale the kept entries by 1/density."""

    name = "random"

    def apply(self, d: torch.Tensor, block: Block, stats: Sequence[float], p: MergeParams) -> torch.Tensor:
        r, n, i = d.shape
        flat = block_flat_index(r, i, block.flat0, block.row_len, d.device)
        keys = [dare_key(p.seed, block.tensor, e) for e in range(n)]
        return dare_drop(d, keys, flat, p.density_list(n))


# -- combination helpers -----------------------------------------------------------------------


def _mask(members: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, N] bool -> [N, R, 1] float, broadcastable against deltas [N, R, I]."""
    return members.t().unsqueeze(-1).to(dtype)


def _weighted_mask(members: torch.Tensor, dtype: torch.dtype, p: MergeParams) -> torch.Tensor:
    """[N, R, 1]: each member's weight, 0 for non-members (unit weights: the 0/1 mask itself)."""
    m = _mask(members, dtype)
    return m if p.unit_weights() else m * p.weight_vector(m.shape[0], dtype, m.device).view(-1, 1, 1)


def _weighted_membership(membership: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """[R, K, N] 0/1 -> each member's weight (unit weights: unchanged)."""
    if p.unit_weights():
        return membership
    return membership * p.weight_vector(membership.shape[2], membership.dtype, membership.device)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """A divisor: 0 (a group without members, never looked up) becomes 1."""
    return torch.where(x != 0, x, torch.ones_like(x))


# -- the methods -------------------------------------------------------------------------------


class Method:
    """A registered in-group merge method.

    `params`: the parameters it reads from `parameters:` only; `expert_params`: the ones it
    reads per expert (`experts[i].parameters`, with the value under `parameters:` as the
    default). `sparsifier`: its whole-tensor sparsification, or None.
    `linear`: the result is a weighted sum of the members' (sparsified) task vectors with
    `coefficients`, so the merge computes it as one batched matmul (same values as
    `combine`, which stays the reference).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    expert_params: ClassVar[tuple[str, ...]] = ("weight",)
    sparsifier: ClassVar[Optional[Sparsifier]] = None
    linear: ClassVar[bool] = False

    def uses(self, param: str) -> bool:
        return param in self.params or param in self.expert_params

    def combine(self, deltas: torch.Tensor, members: torch.Tensor, p: MergeParams) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, membership: torch.Tensor, p: MergeParams) -> torch.Tensor:
        """membership [R, K, N] (0/1) -> [R, K, N] weights of each member's task vector."""
        raise NotImplementedError(f"{self.name} is not a weighted sum")


class Average(Method):
    name = "average"
    summary = "weighted mean of the members' task vectors, sum w·τ / sum w (plain weight averaging; mergekit `linear`)"
    linear = True

    def combine(self, deltas: torch.Tensor, members: torch.Tensor, p: MergeParams) -> torch.Tensor:
        m = _weighted_mask(members, deltas.dtype, p)
        return (deltas * m).sum(0) / _nonzero(m.sum(0))

    def coefficients(self, membership: torch.Tensor, p: MergeParams) -> torch.Tensor:
        wm = _weighted_membership(membership, p)
        return wm / _nonzero(wm.sum(2, keepdim=True))


class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "λ · sum w·τ, divided by sum w with `normalize` (Ilharco et al. 2023)"
    params = ("scale", "normalize")
    linear = True

    def combine(self, deltas: torch.Tensor, members: torch.Tensor, p: MergeParams) -> torch.Tensor:
        m = _weighted_mask(members, deltas.dtype, p)
        out = (deltas * m).sum(0) * p.scale
        return out / _nonzero(m.sum(0)) if p.normalize else out

    def coefficients(self, membership: torch.Tensor, p: MergeParams) -> torch.Tensor:
        wm = _weighted_membership(membership, p)
        if p.normalize:
            return wm * p.scale / _nonzero(wm.sum(2, keepdim=True))
        return wm * p.scale


class Ties(Method):
    name = "ties"
    summary = ("trim each τ to its top `density` by magnitude (whole tensor); elect the sign of sum w·τ "
               "per entry (0 counts as +); weighted mean of the agreeing entries; times λ (Yadav et al. 2023)")
    params = ("scale",)
    expert_params = ("weight", "density")
    sparsifier = Magnitude()

    def combine(self, deltas: torch.Tensor, members: torch.Tensor, p: MergeParams) -> torch.Tensor:
        """Elect a sign per entry, then average only the (trimmed) entries that agree with it.

        `deltas` must already be trimmed (the sparsifier). Weights must be > 0 (the config
        checks it): a weight then never flips an entry's sign.
        """
        wm = _weighted_mask(members, deltas.dtype, p)
        d = deltas * wm  # non-members and trimmed entries are 0
        sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)  # elected; 0 -> +, as mergekit
        signed = d.mul_(sign)  # > 0 exactly where an entry agrees with the elected sign
        agree = signed > 0
        total = signed.clamp_min_(0).sum(0)  # sum of |agreeing weighted entries|
        if p.unit_weights():
            count = torch.count_nonzero(agree, dim=0).clamp_min(1).to(deltas.dtype)
        else:
            count = _nonzero((agree.to(deltas.dtype) * wm).sum(0))
        return total * sign / count * p.scale


class Dare(TaskArithmetic):
    name = "dare"
    summary = ("drop each τ entry at random, keep it with probability `density` and rescale it by 1/density "
               "(seeded); then as `task_arithmetic` (Yu et al. 2024; mergekit `dare_linear`)")
    params = ("scale", "normalize", "seed")
    expert_params = ("weight", "density")
    sparsifier = RandomDrop()


METHODS: dict[str, Method] = {m.name: m for m in (Average(), TaskArithmetic(), Ties(), Dare())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}") from None


# -- generated docs ----------------------------------------------------------------------------


def _fmt_default(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def markdown_tables() -> str:
    """The methods and parameters tables of docs/merge-config.md (a test checks they match)."""
    lines = ["| method | in-group merge | global `parameters` | per expert (`experts[i].parameters`) |",
             "|---|---|---|---|"]
    for m in METHODS.values():
        glob = [p for p in PARAMS if m.uses(p)]
        lines.append(f"| `{m.name}` | {m.summary} | {', '.join(f'`{p}`' for p in glob) or '—'} | "
                     f"{', '.join(f'`{p}`' for p in m.expert_params) or '—'} |")
    lines += ["", "| parameter | type | default | per expert | used by | meaning |", "|---|---|---|---|---|---|"]
    for p in PARAMS.values():
        users = [m.name for m in METHODS.values() if m.uses(p.name)]
        lines.append(f"| `{p.name}` | {p.type} | `{_fmt_default(p.default)}` | {'yes' if p.per_expert else 'no'} | "
                     f"{', '.join(f'`{u}`' for u in users)} | {p.doc} |")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    """Plain-text summary of the methods and their parameters (for the CLI's help)."""
    out = ["merge methods (`method:` in the merge config; parameters under `parameters:`, per expert "
           "under `experts[i].parameters:`):"]
    for m in METHODS.values():
        glob = [p for p in PARAMS if m.uses(p)]
        summary = m.summary.replace("`", "").replace("λ", "lambda").replace("τ", "tau")
        out.append(f"  {m.name}: {summary}")
        out.append(f"      parameters: {', '.join(glob) or '-'}; per expert: {', '.join(m.expert_params) or '-'}")
    return "\n".join(out)
