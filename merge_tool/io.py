"""Lazy checkpoint reading and streaming safetensors writing.

Reading: a model folder (single `model.safetensors` or sharded with an index) is opened
lazily: one tensor at a time comes into memory, so a merge of N experts holds about
(N+1) tensors, not N+1 models. Pickled `.bin` weights are refused unless the config allows
them, and then only loaded with `torch.load(weights_only=True)`. Truncated or corrupt
files, NaN/Inf, and experts that do not match the base (names, shapes, vocab,
architecture) are errors naming the file and the tensor.

Writing: `StreamingShardWriter` knows every output tensor's name, dtype and shape up front
(the merge plans them), writes each shard's safetensors header first and then appends each
tensor's bytes as soon as it is computed. Peak memory stays one tensor, whatever the shard
size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import torch

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_DTYPES_REV = {v: k for k, v in _ST_DTYPES.items()}


class InputError(ValueError):
    """An input model is missing, unreadable or incompatible; names the file and tensor."""


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None


class ModelReader:
    """Lazy access to one HF model folder's config and tensors."""

    def __init__(self, path: str | Path, role: str = "model", allow_pickle: bool = False,
                 check_finite: bool = True) -> None:
        self.path = Path(path)
        self.role = role
        self.check_finite = check_finite
        if not self.path.exists():
            raise InputError(f"{role}: model folder {self.path} not found")
        if not self.path.is_dir():
            raise InputError(f"{role}: {self.path} is not a folder")
        self.config: dict[str, Any] = _load_json(self.path / "config.json")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self.is_pickle = False
        self._open(allow_pickle)

    # -- discovery -------------------------------------------------------------------------

    def _open(self, allow_pickle: bool) -> None:
        p = self.path
        if (p / SAFE_INDEX).exists():
            self._from_index(p / SAFE_INDEX)
        elif (p / SAFE_SINGLE).exists():
            self._scan([p / SAFE_SINGLE])
        elif sorted(p.glob("*.safetensors")):
            self._scan(sorted(p.glob("*.safetensors")))
        elif (p / BIN_INDEX).exists() or (p / BIN_SINGLE).exists():
            where = p / (BIN_INDEX if (p / BIN_INDEX).exists() else BIN_SINGLE)
            if not allow_pickle:
                raise InputError(
                    f"{where}: pickled PyTorch weights are refused (loading a pickle can run code). "
                    "Convert the model to safetensors, or set `allow_pickle_weights: true` in the "
                    "merge config to load it with torch.load(weights_only=True)")
            self.is_pickle = True
            self._from_bin(p)
        else:
            raise InputError(f"{self.role}: no weights in {p} (expected model.safetensors or "
                             f"{SAFE_INDEX} with its shards)")

    def _from_index(self, index: Path) -> None:
        data = _load_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise InputError(f"{index}: no 'weight_map' in the index")
        files = sorted({self.path / f for f in wm.values()})
        for f in files:
            if not f.exists():
                raise InputError(f"{f}: shard listed in {index.name} is missing")
        self._scan(files)
        for name, f in wm.items():
            if self._file_of.get(name) != self.path / f:
                raise InputError(f"{index}: tensor {name!r} is mapped to {f} but is not in that file")

    def _scan(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types
                raise InputError(f"{f}: not a valid safetensors file (truncated or corrupt?): {e}") from None
            size = f.stat().st_size
            try:
                end = self._data_end(f)
            except Exception as e:
                raise InputError(f"{f}: unreadable safetensors header: {e}") from None
            if end != size:
                raise InputError(f"{f}: file is {size} bytes but its header describes {end} bytes "
                                 "(truncated or corrupt)")
            self._handles[f] = h
            for k in keys:
                if k in self._file_of:
                    raise InputError(f"{f}: tensor {k!r} also appears in {self._file_of[k]}")
                self._file_of[k] = f

    @staticmethod
    def _data_end(f: Path) -> int:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + (max(ends) if ends else 0)

    def _from_bin(self, p: Path) -> None:
        if (p / BIN_INDEX).exists():
            wm = _load_json(p / BIN_INDEX).get("weight_map", {})
            files = sorted({p / f for f in wm.values()})
        else:
            files = [p / BIN_SINGLE]
        for f in files:
            log.warning("%s: loading pickled weights with torch.load(weights_only=True)", f)
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise InputError(f"{f}: file not found") from None
            except Exception as e:
                raise InputError(f"{f}: refused or unreadable with weights_only=True: {e}") from None
            if not isinstance(sd, dict):
                raise InputError(f"{f}: expected a state dict")
            self._bin_cache[f] = sd
            for k in sd:
                self._file_of[k] = f

    # -- access ----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._file_of[name]
        if f in self._bin_cache:
            return tuple(self._bin_cache[f][name].shape)
        return tuple(self._handles[f].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        f = self._file_of[name]
        if f in self._bin_cache:
            return self._bin_cache[f][name].dtype
        return _ST_DTYPES_REV.get(self._handles[f].get_slice(name).get_dtype(), torch.float32)

    def get(self, name: str, check: bool = True) -> torch.Tensor:
        """One tensor; NaN/Inf is an error naming file and tensor (unless `check` is False:
        the caller then checks cheaply itself)."""
        if name not in self._file_of:
            raise InputError(f"{self.role} ({self.path}): tensor {name!r} is missing")
        f = self._file_of[name]
        try:
            t = self._bin_cache[f][name] if f in self._bin_cache else self._handles[f].get_tensor(name)
        except Exception as e:
            raise InputError(f"{f}: cannot read tensor {name!r} (corrupt file?): {e}") from None
        if check and self.check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"{f}: tensor {name!r} contains {bad} NaN/Inf value(s)")
        return t

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache.clear()

    @property
    def architecture(self) -> str:
        arch = self.config.get("architectures") or ["?"]
        return str(arch[0])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def check_compatible(base: ModelReader, experts: dict[str, ModelReader]) -> None:
    """Every expert must be a fine-tune of the base: same architecture, vocab, names, shapes."""
    bnames = set(base.names)
    for name, ex in experts.items():
        where = f"expert {name!r} ({ex.path})"
        if ex.architecture != base.architecture:
            raise InputError(f"{where}/config.json: architectures is {ex.architecture!r}, "
                             f"base ({base.path}) is {base.architecture!r}")
        for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "intermediate_size",
                    "tie_word_embeddings"):
            if base.config.get(key) != ex.config.get(key):
                raise InputError(f"{where}/config.json: {key} is {ex.config.get(key)!r}, "
                                 f"base is {base.config.get(key)!r}")
        enames = set(ex.names)
        missing = sorted(bnames - enames)
        if missing:
            raise InputError(f"{where}: tensor {missing[0]!r} of the base is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(enames - bnames)
        if extra:
            raise InputError(f"{ex.file_of(extra[0])}: tensor {extra[0]!r} is not in the base"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for t in base.names:
            if ex.shape(t) != base.shape(t):
                raise InputError(f"{ex.file_of(t)}: tensor {t!r} has shape {list(ex.shape(t))}, "
                                 f"base has {list(base.shape(t))}")


# -- writing -----------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class StreamingShardWriter:
    """Writes HF sharded safetensors whose tensors are all known in advance.

    Tensors must be `write()`-n in plan order; each shard's header is written when the
    shard is opened, data is appended as it arrives, and `close()` checks completeness
    and writes the index.
    """

    def __init__(self, out_dir: Path, plan: list[PlannedTensor], max_shard_bytes: int,
                 metadata: Optional[dict[str, str]] = None) -> None:
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        self.shards = shards
        self.total_size = sum(t.nbytes for t in plan)
        self.weight_map = {t.name: shard_name(i, len(shards)) for i, s in enumerate(shards) for t in s}
        self._pos = 0  # index into plan
        self._shard = -1
        self._fh: Optional[BinaryIO] = None
        self._shard_pos = 0

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        off = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        self._fh = open(self.out_dir / shard_name(i, len(self.shards)), "wb")
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._shard = i
        self._shard_pos = 0

    def begin(self, name: str) -> PlannedTensor:
        """Start the next planned tensor (its bytes may then come in pieces, `write_at`)."""
        if self._pos >= len(self.plan):
            raise RuntimeError(f"unplanned tensor {name!r}")
        exp = self.plan[self._pos]
        if exp.name != name:
            raise RuntimeError(f"writer expected {exp.name}, got {name}")
        if self._shard < 0 or self._shard_pos >= len(self.shards[self._shard]):
            self._open_shard(self._shard + 1)
        self._cur_start = self._fh.tell() if self._fh is not None else 0
        self._cur_written = 0
        return exp

    def write_at(self, offset: int, tensor: torch.Tensor) -> None:
        """Bytes of the current tensor at `offset` bytes from its start (any order)."""
        t = tensor.detach().to("cpu").contiguous()
        assert self._fh is not None
        if t.numel():
            self._fh.seek(self._cur_start + offset)
            self._fh.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            self._cur_written += t.numel() * t.element_size()

    def end(self) -> None:
        """Finish the current tensor: every byte must have been written exactly once."""
        exp = self.plan[self._pos]
        if self._cur_written != exp.nbytes:
            raise RuntimeError(f"{exp.name}: wrote {self._cur_written} of {exp.nbytes} bytes")
        assert self._fh is not None
        self._fh.seek(self._cur_start + exp.nbytes)
        self._pos += 1
        self._shard_pos += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A whole planned tensor, in plan order."""
        exp = self.begin(name)
        if tuple(tensor.shape) != exp.shape or tensor.dtype != exp.dtype:
            raise RuntimeError(f"writer expected {exp.name} {exp.dtype} {exp.shape}, got {name} "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        self.write_at(0, tensor)
        self.end()

    def close(self) -> Path:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self.plan):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self.plan)} tensors")
        index = self.out_dir / SAFE_INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self.total_size},
                                     "weight_map": self.weight_map}, indent=2) + "\n")
        return index

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "generation_config.json", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the base's tokenizer (and generation config) files; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            (Path(dst) / name).write_bytes(f.read_bytes())
            copied.append(name)
    return copied


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_dir(tmp: Path, out: Path) -> None:
    """Atomic-ish publish: the target is either the old folder or the complete new one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        tmp.rename(out)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, published as `out` only if the block succeeds.

    On any error (Ctrl-C included) the temporary folder is removed and `out` is untouched,
    so no half-written output is ever left behind.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
