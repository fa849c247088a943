"""Checkpoint formats v1 and v2: the single source of truth shared by the merge tool and the plugin.

Importable without vLLM (and without torch). Everything that names a tensor, a config
field or a file of a channel-merged checkpoint is defined here and nowhere else.

Layout of a merged checkpoint directory::

    config.json                      base config + architectures + quantization_config
    model-0000i-of-0000n.safetensors weights (see below)
    model.safetensors.index.json
    tokenizer files, README.md (model card), channelmerge.yaml (the merge config used)
    channelmerge/norms.safetensors   per-expert norm weights that were folded (for extract)
    channelmerge/report.json         per-tensor merge statistics (for inspect)
    router/                          optional `auto` router (JSON / safetensors only)

Weights: every channel-merged tensor ``X.weight`` is stored as ``[K, out, in]`` (K groups),
with ``X.group_index`` ``[N, out]`` (int32, values in ``[0, K)``) mapping each expert's
output channel to its group, and ``X.bias`` (if any) as ``[K, out]``. Group 0 is each
channel's largest group (runtime strategies rely on this). Other tensors (norms) are stored
as in a plain HF checkpoint, except an *expert norm* (the final norm): stored as ones, with
each expert's weight in ``<norm>.expert_weight`` ``[N, hidden]``, applied by the runtime to
the rows given to the lm_head, so that a tied lm_head stays tied (and stored once).

Format v2 (a *row table*, written by a merge under a memory budget) stores each channel-merged
tensor as ``X.weight`` ``[R, in]``: rows ``0..out-1`` are each channel's *primary* row (its
largest group, as group 0 in v1) and the ``R - out`` *extra* rows follow, ordered by channel;
``X.row_index`` ``[N, out]`` (int32) gives the row expert ``n``'s channel ``c`` uses (``c``
itself, or an extra row of channel ``c``), ``X.bias`` (if any) is ``[R]``.
``quantization_config.extra_rows`` gives ``R - out`` per module. A v1 checkpoint is the special
case ``R = K * out``, ``row_index = group_index * out + channel``.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from vllm_channelmerge import architectures as archs

FORMAT_VERSION = 1  # groups: what a merge without a memory budget writes
ROW_TABLE_VERSION = 2  # row table: what a merge under a memory budget writes
FORMAT_VERSIONS = (FORMAT_VERSION, ROW_TABLE_VERSION)
QUANT_METHOD = "channel_merged"

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
MERGE_CONFIG_FILE = "channelmerge.yaml"
MODEL_CARD_FILE = "README.md"
SIDECAR_DIR = "channelmerge"
NORMS_FILE = f"{SIDECAR_DIR}/norms.safetensors"
REPORT_FILE = f"{SIDECAR_DIR}/report.json"
ROUTER_DIR = "router"

GROUP_INDEX_SUFFIX = ".group_index"  # never ".g_idx": vLLM's loaders drop that suffix
GROUP_INDEX_DTYPE = "int32"
ROW_INDEX_SUFFIX = ".row_index"  # v2; same dtype as group_index
INDEX_SUFFIXES = (GROUP_INDEX_SUFFIX, ROW_INDEX_SUFFIX)
EXPERT_WEIGHT_SUFFIX = ".expert_weight"
# Norms a checkpoint may keep per expert (`expert_norms`): the runtime applies them right
# before the lm_head, which is only correct for the final norm.
EXPERT_NORM_MODULES = archs.EXPERT_NORM_MODULES

# Model name reserved for the router; never a valid expert name.
AUTO_MODEL_NAME = "auto"
RESERVED_NAMES = frozenset({AUTO_MODEL_NAME})
_EXPERT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch

# Safetensors header metadata binding the expert names to the rows of every `group_index`
# (and `expert_weight`) tensor of a shard: a config whose `experts` list was reordered or
# edited no longer matches and the checkpoint is refused at load.
SHARD_EXPERTS_KEY = "channelmerge_experts"
SHARD_FORMAT_KEY = "channelmerge_format_version"

# Base architecture -> the plugin's wrapper class written into config.json (the
# architectures themselves are data in vllm_channelmerge/architectures.py).
WRAPPER_ARCHITECTURES: dict[str, str] = {s.name: s.wrapper for s in archs.SPECS}
BASE_ARCHITECTURES: dict[str, str] = {v: k for k, v in WRAPPER_ARCHITECTURES.items()}

# Modules whose weights are channel-merged (stored [K, out, in] + group_index).
CHANNEL_MODULE_SUFFIXES = archs.CHANNEL_MODULE_SUFFIXES
EMBED_MODULE, = {s.embedding for s in archs.SPECS}  # the same in every supported architecture
LM_HEAD_MODULE, = {s.lm_head for s in archs.SPECS}
# vLLM fuses these along `out`; constituents must share K.
FUSED_MODULES = archs.FUSED_MODULES


class FormatError(ValueError):
    """A checkpoint does not follow format v1. The message names the file, tensor or field."""


def validate_expert_name(name: object, where: str = "experts") -> str:
    """Expert names become OpenAI model names: letters, digits and `-_.`, not reserved."""
    if not isinstance(name, str) or not _EXPERT_NAME_RE.fullmatch(name):
        raise FormatError(
            f"{where}: invalid expert name {name!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise FormatError(f"{where}: expert name {name!r} is reserved (used by the router)")
    return name


def validate_expert_names(names: list[str], where: str = "experts") -> list[str]:
    seen: set[str] = set()
    for n in names:
        validate_expert_name(n, where)
        if n in seen:
            raise FormatError(f"{where}: duplicate expert name {n!r}")
        seen.add(n)
    if not names:
        raise FormatError(f"{where}: at least one expert is required")
    return list(names)


def module_of(tensor_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`."""
    return tensor_name.rsplit(".", 1)[0]


def is_channel_tensor(tensor_name: str) -> bool:
    """Whether a base-model tensor is channel-merged (its weight or bias)."""
    if not tensor_name.endswith((".weight", ".bias")):
        return False
    return module_of(tensor_name).rsplit(".", 1)[-1] in CHANNEL_MODULE_SUFFIXES


def group_index_name(tensor_name: str) -> str:
    """`X.weight` (or `X.bias`, or the module `X`) -> `X.group_index`."""
    mod = module_of(tensor_name) if tensor_name.endswith((".weight", ".bias")) else tensor_name
    return mod + GROUP_INDEX_SUFFIX


def row_index_name(tensor_name: str) -> str:
    """`X.weight` (or `X.bias`, or the module `X`) -> `X.row_index` (format v2)."""
    mod = module_of(tensor_name) if tensor_name.endswith((".weight", ".bias")) else tensor_name
    return mod + ROW_INDEX_SUFFIX


def index_name(tensor_name: str, format_version: int) -> str:
    """The index tensor of a channel tensor: `group_index` (v1) or `row_index` (v2)."""
    return row_index_name(tensor_name) if format_version == ROW_TABLE_VERSION else group_index_name(tensor_name)


def expert_norm_name(norm_module: str) -> str:
    """`model.norm` -> `model.norm.expert_weight` (`[N, hidden]`, one row per expert)."""
    return norm_module + EXPERT_WEIGHT_SUFFIX


def fused_constituents(module_prefix: str) -> list[str]:
    """HF module names behind a (possibly vLLM-fused) module prefix.

    `model.layers.0.self_attn.qkv_proj` -> [... q_proj, ... k_proj, ... v_proj];
    a non-fused prefix maps to itself.
    """
    head, _, last = module_prefix.rpartition(".")
    parts = FUSED_MODULES.get(last)
    if parts is None:
        return [module_prefix]
    return [f"{head}.{p}" if head else p for p in parts]


@dataclass
class ChannelMergedConfig:
    """The `quantization_config` block of config.json."""

    experts: list[str]
    num_groups: int
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD
    method: str = "average"
    similarity: str = "cosine"
    base_architecture: str = "LlamaForCausalLM"
    folded_norms: list[str] = field(default_factory=list)
    # Norm modules kept per expert (stored as ones + `<norm>.expert_weight` [N, hidden]).
    expert_norms: list[str] = field(default_factory=list)
    # Per-module K where it differs from num_groups, keyed by HF module name.
    num_groups_overrides: dict[str, int] = field(default_factory=dict)
    # The expert that serves a request naming none; None (the default) refuses such requests.
    default_expert: str | None = None
    # Format v2 only: extra rows (R - out) per channel-merged module, keyed by HF module name;
    # a module not listed has none (every channel one row).
    extra_rows: dict[str, int] = field(default_factory=dict)
    # Format v2 only, informative: the budget the merge met (e.g. {"params_ratio": 0.35, ...}).
    budget: dict[str, Any] | None = None

    @property
    def row_table(self) -> bool:
        """Whether tensors are stored as a row table (format v2) rather than K groups (v1)."""
        return self.format_version == ROW_TABLE_VERSION

    def extra_rows_for(self, module_prefix: str) -> list[int]:
        """Extra rows of each HF module behind a (possibly vLLM-fused) module prefix (v2)."""
        return [self.extra_rows.get(m, 0) for m in fused_constituents(module_prefix)]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_id(self, name: str) -> int:
        try:
            return self.experts.index(name)
        except ValueError:
            raise FormatError(f"unknown expert {name!r}; valid names: {', '.join(self.experts)}") from None

    def resolve(self, value: Any) -> int:
        """A request's expert (see :func:`resolve_expert`) -> its index in :attr:`experts`."""
        return resolve_expert(value, self.experts, self.default_expert)

    def groups_for(self, module_prefix: str) -> int:
        """K of a module, accepting vLLM's fused names (constituents must agree)."""
        ks = {self.num_groups_overrides.get(m, self.num_groups) for m in fused_constituents(module_prefix)}
        if len(ks) != 1:
            raise FormatError(
                f"quantization_config.num_groups_overrides: fused module {module_prefix!r} has "
                f"constituents with different K {sorted(ks)}; q/k/v and gate/up must share K"
            )
        return ks.pop()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = CONFIG_FILE) -> "ChannelMergedConfig":
        where = f"{source}: quantization_config"
        if not isinstance(d, Mapping):
            raise FormatError(f"{where} must be an object")
        if d.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"{where}.quant_method is {d.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        ver = d.get("format_version")
        if ver not in FORMAT_VERSIONS or isinstance(ver, bool):
            raise FormatError(
                f"{where}.format_version is {ver!r}; this build reads format_version "
                f"{' or '.join(map(str, FORMAT_VERSIONS))}"
            )
        experts = d.get("experts")
        if not isinstance(experts, list):
            raise FormatError(f"{where}.experts must be a list of names")
        try:
            validate_expert_names(experts, f"{where}.experts")
        except FormatError as e:
            raise FormatError(str(e)) from None
        k = d.get("num_groups")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(experts):
            raise FormatError(f"{where}.num_groups is {k!r}; expected an integer in [1, {len(experts)}]")
        overrides = d.get("num_groups_overrides") or {}
        for name, kk in overrides.items():
            if not isinstance(kk, int) or isinstance(kk, bool) or not 1 <= kk <= len(experts):
                raise FormatError(f"{where}.num_groups_overrides[{name!r}] is {kk!r}; expected 1..{len(experts)}")
        default = d.get("default_expert")
        if default is not None and default not in experts:
            raise FormatError(f"{where}.default_expert is {default!r}; it must be one of the experts "
                              f"({', '.join(experts)}) or absent")
        en = d.get("expert_norms") or []
        if not isinstance(en, list) or any(m not in EXPERT_NORM_MODULES for m in en):
            raise FormatError(f"{where}.expert_norms is {en!r}; this build supports only "
                              f"{list(EXPERT_NORM_MODULES)}")
        extra = d.get("extra_rows") or {}
        if extra and ver != ROW_TABLE_VERSION:
            raise FormatError(f"{where}.extra_rows is set but format_version is {ver}; extra rows exist "
                              f"only in format_version {ROW_TABLE_VERSION}")
        if not isinstance(extra, Mapping):
            raise FormatError(f"{where}.extra_rows must be an object (module name -> extra rows)")
        for name, r in extra.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise FormatError(f"{where}.extra_rows[{name!r}] is {r!r}; expected an integer >= 0")
        known = {f.name for f in cls.__dataclass_fields__.values()}  # type: ignore[attr-defined]
        return cls(**{k_: v for k_, v in d.items() if k_ in known})


class ExpertRequestError(ValueError):
    """A request names no expert (and the checkpoint has no default) or an unknown one."""


def resolve_expert(value: Any, experts: list[str], default: str | None = None) -> int:
    """The one rule that turns a request's expert (name, index, or None) into an index.

    None means the request named no expert: it goes to `default` (the merge config's
    `default_expert`) when the checkpoint has one and is refused otherwise, never silently to
    the first expert. An int (not a bool) in range is an index; a name must be an expert's.
    """
    listed = ", ".join(experts)
    if value is None:
        if default is None:
            raise ExpertRequestError(
                "the request names no expert and this checkpoint has no default_expert; name one "
                f"(OpenAI `model`, or SamplingParams(extra_args={{'expert': NAME}})): {listed}")
        value = default
    if isinstance(value, str):
        try:
            return experts.index(value)
        except ValueError:
            raise ExpertRequestError(f"unknown expert {value!r}; valid names: {listed}") from None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < len(experts):
        return int(value)
    raise ExpertRequestError(f"invalid expert {value!r}; valid names: {listed}")


def read_quant_config(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> ChannelMergedConfig:
    """Parse the channel-merged block of a config.json dict."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        raise FormatError(f"{source}: no quantization_config; not a channel-merged checkpoint")
    return ChannelMergedConfig.from_dict(qc, source)


def read_checkpoint_config(model_dir: str | os.PathLike) -> ChannelMergedConfig:
    """The channel-merged block of a checkpoint folder's config.json (errors name the file)."""
    path = os.path.join(str(model_dir), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e}); is {model_dir} a merged checkpoint?") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: not a JSON object")
    return read_quant_config(cfg, path)


def expected_shapes(
    tensor_name: str, base_shape: tuple[int, ...], num_groups: int, num_experts: int,
    extra_rows: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes for one base tensor (the plugin validates against this).

    ``extra_rows`` None: format v1 (``[K, *base_shape]`` + ``group_index``); an int: format v2
    (``[out + extra_rows, *rest]`` + ``row_index``).
    """
    if not is_channel_tensor(tensor_name):
        return {tensor_name: tuple(base_shape)}
    if extra_rows is None:
        out = {tensor_name: (num_groups, *base_shape)}
        if tensor_name.endswith(".weight"):
            out[group_index_name(tensor_name)] = (num_experts, base_shape[0])
        return out
    out = {tensor_name: (base_shape[0] + extra_rows, *base_shape[1:])}
    if tensor_name.endswith(".weight"):
        out[row_index_name(tensor_name)] = (num_experts, base_shape[0])
    return out


def stored_params(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters stored in a checkpoint, not counting group / row indices (from index shapes)."""
    total = 0
    for name, shape in shapes.items():
        if name.endswith(INDEX_SUFFIXES):
            continue
        n = 1
        for s in shape:
            n *= int(s)
        total += n
    return total


def shard_metadata(experts: list[str], format_version: int = FORMAT_VERSION) -> dict[str, str]:
    """The `__metadata__` every shard of a merged checkpoint carries (safetensors: str -> str)."""
    return {SHARD_FORMAT_KEY: str(format_version), SHARD_EXPERTS_KEY: json.dumps(list(experts))}


def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`), no tensor data."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise FormatError(f"{path}: not a safetensors file (header size {n} bytes)")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: unreadable safetensors header (not an object)")
    return header


def check_shard_experts(path: str, experts: list[str]) -> None:
    """Refuse a shard whose expert binding differs from `experts` (the config's list).

    Every shard of a merged checkpoint names, in its safetensors metadata, the experts in the
    order of the `group_index` rows it stores; a reordered or edited `experts` list in
    config.json would otherwise swap experts silently.
    """
    meta = read_safetensors_header(path).get("__metadata__") or {}
    raw = meta.get(SHARD_EXPERTS_KEY)
    if raw is None:
        raise FormatError(
            f"{path}: no '{SHARD_EXPERTS_KEY}' in the safetensors metadata, so nothing binds its "
            "group_index rows to expert names (written by an older channelmerge?); merge again "
            "with this version")
    try:
        bound = json.loads(raw)
    except ValueError:
        bound = None
    if bound != list(experts):
        raise FormatError(
            f"{path}: its group_index rows belong to experts {bound!r} (safetensors metadata "
            f"'{SHARD_EXPERTS_KEY}') but {CONFIG_FILE} quantization_config.experts lists "
            f"{list(experts)!r}; the expert list was edited or reordered; restore it")


def checkpoint_shards(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint folder: those of its index, else `*.safetensors`."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f).get("weight_map") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise FormatError(f"{index}: cannot read the index ({e})") from None
        return sorted({os.path.join(model_dir, v) for v in wm.values()})
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def check_checkpoint_experts(model_dir: str, experts: list[str]) -> None:
    """:func:`check_shard_experts` on every weight shard of a merged checkpoint folder."""
    shards = checkpoint_shards(model_dir)
    if not shards:
        raise FormatError(f"{model_dir}: no safetensors weights")
    for s in shards:
        check_shard_experts(s, experts)
