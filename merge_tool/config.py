"""The merge configuration (`merge.yaml`): pydantic models and a loader with clear errors.

mergekit users should feel at home: `base_model`, a list of `experts` (`name` + `model`),
a `method` with its `parameters`. Every validation error names the file, the field and the
allowed values, because a merge that fails after minutes on a typo is the worst outcome.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from merge_tool import budget as _budget
from merge_tool import methods as _methods
from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

METHODS = tuple(_methods.METHODS)  # the registry's names, in its order
SIMILARITIES = ("cosine", "euclidean")
# How a merge under a `budget` measures the error a channel's extra rows remove (merge_tool/budget.py).
BUDGET_CRITERIA = _budget.CRITERIA
DTYPES = ("auto", "float32", "bfloat16", "float16")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
               "G": 10**9, "T": 10**12}


class ConfigError(ValueError):
    """A merge config is invalid. The message names the file and the field."""


# Numbers are strict: a bool (`true` is 1 to Python) or a string is never silently a number,
# and a float must be finite (`.nan`, `.inf`) and in its field's range. An int is a float
# (YAML reads `scale: 1` as an int). A string in exponent notation without a dot (`1e-3`) is
# read as the number it spells, because YAML 1.1 (PyYAML) leaves such values as strings.
_EXP_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_ABS_SCALE = 1e3
MAX_INT = 2**63 - 1


def _strict_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r} ({type(v).__name__})")
    if not -MAX_INT <= v <= MAX_INT:
        raise ValueError(f"{_short(v)} is out of range")
    return v


def _strict_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r} ({type(v).__name__})")
    return v


def _short(v: Any) -> str:
    t = str(v)
    return t if len(t) <= 24 else f"{t[:12]}...({len(t)} characters)"


def _strict_float(v: Any) -> float:
    if isinstance(v, str) and _EXP_FLOAT_RE.fullmatch(v.strip()):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r} ({type(v).__name__})")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{_short(v)} is out of range") from None
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {v!r}")
    return f


StrictNumInt = Annotated[int, BeforeValidator(_strict_int)]
StrictNumFloat = Annotated[float, BeforeValidator(_strict_float)]
StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]


def parse_size(value: int | str) -> int:
    """`"2GB"`, `"500MiB"` or an int of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GB, 500MB or a number of bytes")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("size must be positive")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use e.g. 2GB, 500MB, 1GiB or a number of bytes")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


def _check_size(v: Any) -> int | str:
    """A size field's value as given (`2GB` or bytes), after checking that it parses."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"expected a size such as 2GB, 500MB or a number of bytes, got {v!r}")
    parse_size(v)
    return v


_P = _methods.PARAMS


def _check_density(v: Optional[float]) -> Optional[float]:
    if v is not None and not 0.0 < v <= 1.0:
        raise ValueError("density must be in (0, 1]")
    return v


def _check_weight(v: Optional[float]) -> Optional[float]:
    # > 0: average, ties and `normalize` divide by a group's sum of weights, and TIES elects
    # signs of weighted entries; a zero or negative weight would make those meaningless.
    if v is not None and not 0.0 < v <= MAX_ABS_SCALE:
        raise ValueError(f"weight is {v!r}; it must be > 0 and <= {MAX_ABS_SCALE:g}")
    return v


class ExpertParams(BaseModel):
    """Per-expert method parameters (`experts[i].parameters`, as mergekit's per-model
    `parameters`); each overrides the global value under `parameters:` for this expert."""

    model_config = ConfigDict(extra="forbid")
    weight: Optional[StrictNumFloat] = Field(None, description=_P["weight"].doc)
    density: Optional[StrictNumFloat] = Field(None, description=_P["density"].doc)

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: Optional[float]) -> Optional[float]:
        return _check_weight(v)

    @field_validator("density")
    @classmethod
    def _density(cls, v: Optional[float]) -> Optional[float]:
        return _check_density(v)


class ExpertSpec(BaseModel):
    """One fine-tuned expert: its public (OpenAI model) name, its HF folder and, optionally,
    its own method parameters."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    model: StrictStr
    parameters: Optional[ExpertParams] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return fmt.validate_expert_name(v, "name")
        except fmt.FormatError as e:
            raise ValueError(str(e).removeprefix("name: ")) from None


class MethodParams(BaseModel):
    """Global parameters of the in-group merge method (`parameters:`); their defaults and
    meaning come from the registry (`merge_tool.methods.PARAMS`). A parameter the chosen
    method does not read is ignored with a warning, as mergekit ignores it."""

    model_config = ConfigDict(extra="forbid")
    scale: StrictNumFloat = Field(_P["scale"].default, description=_P["scale"].doc)
    density: StrictNumFloat = Field(_P["density"].default, description=_P["density"].doc)
    seed: StrictNumInt = Field(_P["seed"].default, description=_P["seed"].doc)
    normalize: StrictBool = Field(_P["normalize"].default, description=_P["normalize"].doc)
    weight: StrictNumFloat = Field(_P["weight"].default, description=_P["weight"].doc)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lambda" in data:
            data = dict(data)
            if "scale" in data:
                raise ValueError("give either 'scale' or its alias 'lambda', not both")
            data["scale"] = data.pop("lambda")
        return data

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        return _check_density(v)

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        return _check_weight(v)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        # Task vectors are small; a larger scale only overflows the output dtype.
        if abs(v) > MAX_ABS_SCALE:
            raise ValueError(f"scale is {v!r}; it must be between -{MAX_ABS_SCALE:g} and {MAX_ABS_SCALE:g}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"seed is {v}; it must be >= 0")
        return v


# Every registry parameter is a MethodParams field, and the per-expert ones ExpertParams fields:
# a parameter added to the registry without its validation fails at import, not in a merge.
if (set(MethodParams.model_fields) != set(_P)
        or set(ExpertParams.model_fields) != {p.name for p in _P.values() if p.per_expert}):
    raise ImportError("merge_tool.methods.PARAMS and the config's parameter fields disagree")

_PARAM_KEYS = ("scale", "lambda", "density", "seed", "normalize")


class RouterSpec(BaseModel):
    """Optional `router:` section: `channelmerge merge` then trains the `auto` router."""

    model_config = ConfigDict(extra="forbid")

    examples: StrictStr = Field(description="JSON-lines file of example prompts per expert")


class CalibrationSpec(BaseModel):
    """Optional `calibration:` section: the texts an `activation*` budget criterion runs through
    the base model (merge_tool/calibration.py)."""

    model_config = ConfigDict(extra="forbid")

    file: StrictStr = Field(description="JSON lines with a \"text\" field, or one text per line")
    max_tokens: StrictNumInt = Field(2048, description="tokens run in all (texts in order, the last cut)")

    @field_validator("max_tokens")
    @classmethod
    def _tokens(cls, v: int) -> int:
        if not 1 <= v <= 10**7:
            raise ValueError(f"is {v}; it must be between 1 and 10000000")
        return v


class MergeConfig(BaseModel):
    """Everything a merge needs; written back into the checkpoint as `channelmerge.yaml`."""

    model_config = ConfigDict(extra="forbid")

    base_model: StrictStr
    experts: list[ExpertSpec]
    num_groups: StrictNumInt = Field(description="K: groups per channel, 1 <= K <= number of experts")
    num_groups_overrides: dict[StrictStr, StrictNumInt] = Field(
        default_factory=dict,
        description="glob pattern on tensor or module name -> K for the matching tensors")
    similarity: Literal["cosine", "euclidean"] = "cosine"
    method: Literal[METHODS] = "average"  # type: ignore[valid-type]  # the registry's names
    parameters: MethodParams = Field(default_factory=MethodParams)
    fold_norms: StrictBool = True
    collapse_identical: StrictBool = Field(
        True, description="store a channel tensor that every expert has identical once (K=1), exactly")
    include: list[StrictStr] = Field(default_factory=lambda: ["*"])
    exclude: list[StrictStr] = Field(default_factory=list)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: int | str = "5GB"
    allow_pickle_weights: StrictBool = Field(
        False, description="load pytorch_model*.bin with torch.load(weights_only=True)")
    block_rows: StrictNumInt = Field(4096, description="output channels processed at once (memory bound)")
    kmeans_threshold: StrictNumInt = Field(
        4096, description="enumerate partitions exactly when there are at most this many")
    default_expert: Optional[StrictStr] = Field(
        None, description="expert serving a request that names none; None refuses such requests")
    router: RouterSpec | None = Field(
        None, description="train the `auto` router after the merge (`channelmerge merge` only)")
    budget: Optional[StrictNumFloat] = Field(
        None, description="stored parameters / the ensemble's (N x base): each channel gets 1..K rows "
                          "(format v2); absent: K rows everywhere (format v1)")
    budget_bytes: Optional[int | str] = Field(
        None, description="as `budget`, in bytes of tensor data (a size such as 24GB)")
    budget_criterion: Optional[Literal[BUDGET_CRITERIA]] = Field(  # type: ignore[valid-type]
        None, description="what an extra row must reduce (default weight_per_tensor); only with a budget")
    calibration: CalibrationSpec | None = Field(
        None, description="texts for an activation* budget criterion (required by it, refused without)")

    @model_validator(mode="before")
    @classmethod
    def _top_level_params(cls, data: Any) -> Any:
        """mergekit habit: `density`, `scale`/`lambda`, `seed` at the top level."""
        if not isinstance(data, dict):
            return data
        moved = {k: data[k] for k in _PARAM_KEYS if k in data}
        if not moved:
            return data
        data = {k: v for k, v in data.items() if k not in _PARAM_KEYS}
        params = data.get("parameters")
        params = dict(params) if isinstance(params, dict) else {}
        for k, v in moved.items():
            if k in params or (k in ("scale", "lambda") and ({"scale", "lambda"} & set(params))):
                raise ValueError(f"{k!r} is given both at the top level and under 'parameters'")
            params[k] = v
        data["parameters"] = params
        return data

    @field_validator("experts")
    @classmethod
    def _experts(cls, v: list[ExpertSpec]) -> list[ExpertSpec]:
        if not v:
            raise ValueError("at least one expert is required")
        seen: set[str] = set()
        for e in v:
            if e.name in seen:
                raise ValueError(f"duplicate expert name {e.name!r}; names must be unique")
            seen.add(e.name)
        return v

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard(cls, v: Any) -> int | str:
        return _check_size(v)

    @field_validator("budget_bytes", mode="before")
    @classmethod
    def _budget_bytes(cls, v: Any) -> Optional[int | str]:
        return None if v is None else _check_size(v)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"is {v:g}; it must be in (0, 1]: stored parameters / the ensemble's "
                             "(N x base), e.g. 0.35")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "MergeConfig":
        if self.budget is not None and self.budget_bytes is not None:
            raise ValueError("budget and budget_bytes are mutually exclusive; give one of them")
        if self.budget_criterion is not None and not self.has_budget:
            raise ValueError(f"budget_criterion is {self.budget_criterion!r} but there is no budget "
                             "(budget or budget_bytes); remove it or set a budget")
        data_aware = _budget.measure_of(self.criterion) == "activation"
        if data_aware and self.calibration is None:
            raise ValueError(f"budget_criterion {self.criterion!r} measures the error on calibration "
                             "inputs: give `calibration: {file: TEXTS}` (JSON lines with a \"text\" field)")
        if self.calibration is not None and not (self.has_budget and data_aware):
            raise ValueError(f"calibration is given but the budget criterion is {self.criterion!r}"
                             f"{'' if self.has_budget else ' and there is no budget'}; only the activation "
                             "criteria read it (remove it, or set budget_criterion: activation_per_tensor)")
        return self

    @field_validator("block_rows", "kmeans_threshold")
    @classmethod
    def _positive(cls, v: int) -> int:
        if not 1 <= v <= 2**31 - 1:
            raise ValueError(f"is {v}; it must be between 1 and {2**31 - 1}")
        return v

    @model_validator(mode="after")
    def _groups(self) -> "MergeConfig":
        n = len(self.experts)
        if isinstance(self.num_groups, bool) or not 1 <= self.num_groups <= n:
            raise ValueError(f"num_groups is {self.num_groups}; it must be between 1 and the "
                             f"number of experts ({n})")
        for pat, k in self.num_groups_overrides.items():
            if isinstance(k, bool) or not 1 <= k <= n:
                raise ValueError(f"num_groups_overrides[{pat!r}] is {k}; it must be between 1 and "
                                 f"the number of experts ({n})")
        return self

    @model_validator(mode="after")
    def _unused_parameters(self) -> "MergeConfig":
        """Parameters the method does not read: ignored (as by mergekit), but never silently."""
        m = _methods.get_method(self.method)
        unused = [f"parameters.{k}" for k in self.parameters.model_fields_set if not m.uses(k)]
        for i, e in enumerate(self.experts):
            if e.parameters is not None:
                unused += [f"experts.{i}.parameters.{k}" for k in e.parameters.model_fields_set
                           if getattr(e.parameters, k) is not None and not m.uses(k)]
        if unused:
            log.warning("method %s does not use %s; ignored", self.method, ", ".join(sorted(unused)))
        return self

    @field_validator("default_expert")
    @classmethod
    def _default_expert(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        experts = info.data.get("experts")
        if v is not None and experts is not None and v not in [e.name for e in experts]:
            raise ValueError(f"{v!r} is not one of the experts ({', '.join(e.name for e in experts)})")
        return v

    # -- derived -----------------------------------------------------------------------------

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def has_budget(self) -> bool:
        """Whether the merge runs under a memory budget (and writes format v2)."""
        return self.budget is not None or self.budget_bytes is not None

    @property
    def criterion(self) -> str:
        """`budget_criterion`, defaulted."""
        # The default is the criterion that kept the most accuracy on the quality benchmark's
        # validation split among those that need no calibration data (benchmarks/quality/
        # RESULTS.md, "Merging under a memory budget"); activation_relative did as well or better
        # but needs texts, so it is never chosen for the user.
        return self.budget_criterion or "weight_per_tensor"

    @property
    def budget_target_bytes(self) -> Optional[int]:
        return None if self.budget_bytes is None else parse_size(self.budget_bytes)

    def merge_params(self) -> _methods.MergeParams:
        """The method's parameters with each expert's own `weight` / `density` filled in
        (the expert's value, else the one under `parameters:`, as in mergekit)."""
        p = self.parameters

        def per_expert(name: str) -> Optional[tuple[float, ...]]:
            vals = [getattr(e.parameters, name) if e.parameters is not None else None for e in self.experts]
            if all(v is None for v in vals) and getattr(p, name) == _P[name].default:
                return None  # every expert at the default: the merge's plain path
            return tuple(getattr(p, name) if v is None else v for v in vals)

        return _methods.MergeParams(scale=p.scale, normalize=p.normalize, seed=p.seed, density=p.density,
                                    weights=per_expert("weight"), densities=per_expert("density"))

    def used_parameters(self) -> dict[str, Any]:
        """What the method reads: {global name: value}, and `experts` {name: {param: value}}
        when any expert has its own value (for the report, the model card, channelmerge.yaml)."""
        m = _methods.get_method(self.method)
        out: dict[str, Any] = {k: v for k, v in self.parameters.model_dump().items() if m.uses(k)}
        own = {e.name: {k: v for k, v in e.parameters.model_dump().items() if v is not None and m.uses(k)}
               for e in self.experts if e.parameters is not None}
        own = {n: d for n, d in own.items() if d}
        if own:
            out["experts"] = own
        return out

    def is_selected(self, tensor_name: str) -> bool:
        """Whether a channel tensor is channel-merged with its K (else stored with K=1)."""
        inc = any(_match(p, tensor_name) for p in self.include)
        exc = any(_match(p, tensor_name) for p in self.exclude)
        return inc and not exc

    def groups_for_tensor(self, tensor_name: str) -> int:
        """K of one channel tensor: excluded -> 1; else the last matching override, else K."""
        if not self.is_selected(tensor_name):
            return 1
        k = self.num_groups
        for pat, kk in self.num_groups_overrides.items():
            if _match(pat, tensor_name):
                k = kk
        return k

    def resolved(self, base_dir: Path) -> "MergeConfig":
        """A copy whose relative model paths are resolved against `base_dir`."""
        def res(p: str) -> str:
            pp = Path(p).expanduser()
            return str(pp if pp.is_absolute() else (base_dir / pp).resolve())
        update: dict[str, Any] = {
            "base_model": res(self.base_model),
            "experts": [e.model_copy(update={"model": res(e.model)}) for e in self.experts],
        }
        if self.router is not None:
            update["router"] = RouterSpec(examples=res(self.router.examples))
        if self.calibration is not None:
            update["calibration"] = self.calibration.model_copy(update={"file": res(self.calibration.file)})
        return self.model_copy(update=update)


def _match(pattern: str, tensor_name: str) -> bool:
    """Glob match on the tensor name or its module name (`X.weight` -> `X`)."""
    return fnmatch.fnmatchcase(tensor_name, pattern) or fnmatch.fnmatchcase(fmt.module_of(tensor_name), pattern)


_ALLOWED = {
    "similarity": SIMILARITIES,
    "budget_criterion": BUDGET_CRITERIA,
    "method": METHODS,
    "dtype": DTYPES,
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error":
            allowed = _ALLOWED.get(str(e["loc"][-1]))
            if allowed:
                msg = f"got {e.get('input')!r}; allowed values: {', '.join(allowed)}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
            if len(e["loc"]) == 1:
                msg += f"; allowed fields: {', '.join(MergeConfig.model_fields)}"
            elif e["loc"][0] == "parameters":
                msg += f"; allowed fields: {', '.join(MethodParams.model_fields)} (or lambda)"
            elif e["loc"][0] == "experts" and len(e["loc"]) == 3:
                msg += f"; allowed fields: {', '.join(ExpertSpec.model_fields)}"
            elif e["loc"][0] == "experts":
                msg += f"; allowed fields: {', '.join(ExpertParams.model_fields)}"
            elif e["loc"][0] == "router":
                msg += "; allowed fields: examples"
            elif e["loc"][0] == "calibration":
                msg += f"; allowed fields: {', '.join(CalibrationSpec.model_fields)}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<merge config>") -> MergeConfig:
    """Validate a dict into a MergeConfig; ConfigError naming `source` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the merge config must be a mapping (YAML object)")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path) -> MergeConfig:
    """Read `merge.yaml`; relative model paths are resolved against the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: merge config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    return parse_config(data, str(p)).resolved(p.parent.resolve())


def dump_config(cfg: MergeConfig) -> str:
    """YAML text of a config (what is written as `channelmerge.yaml`)."""
    data = cfg.model_dump(mode="json")
    for key in ("router", "default_expert", "budget", "budget_bytes", "budget_criterion", "calibration"):
        if data.get(key) is None:
            data.pop(key, None)  # optional: absent when unused
    # The record of what the merge used: the parameters the method reads, and per-expert
    # ones only where given (so that re-reading it warns about nothing).
    m = _methods.get_method(cfg.method)
    data["parameters"] = {k: v for k, v in data["parameters"].items() if m.uses(k)}
    for e in data["experts"]:
        own = {k: v for k, v in (e.get("parameters") or {}).items() if v is not None and m.uses(k)}
        if own:
            e["parameters"] = own
        else:
            e.pop("parameters", None)
    return yaml.safe_dump(data, sort_keys=False)
