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
size. Every floating block is checked finite before it is written.

Publishing: `staged_dir` writes an output into a temporary folder beside it and publishes it
by one rename that never replaces anything but channelmerge's own previous output (see the
comment above `staged_dir`'s helpers); `check_not_overlapping` keeps outputs off inputs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch

from vllm_channelmerge import format as fmt

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


class OutputError(RuntimeError):
    """An output cannot be written or published safely; the message names the path or tensor."""


class OutputBusyError(OutputError):
    """Another process holds the lock of the same output folder."""


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
        header = fmt.read_safetensors_header(str(f))
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


def split_into_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split planned tensors, in order, into shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own). The merge plan and the writer both use it."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


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
        self.shards = shards = split_into_shards(plan, max_shard_bytes)
        self.total_size = sum(t.nbytes for t in plan)
        self.weight_map = {t.name: shard_name(i, len(shards)) for i, s in enumerate(shards) for t in s}
        self._pos = 0  # index into plan
        self._shard = -1
        self._fh: Optional[BinaryIO] = None
        self._shard_path: Optional[Path] = None
        self._shard_pos = 0
        self._cur_start = self._cur_written = self._cur_nonfinite = 0

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self._shard_path)) from None
        header: dict[str, Any] = {"__metadata__": self.metadata}
        off = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        path = self.out_dir / shard_name(i, len(self.shards))
        self._shard_path = path
        try:
            self._fh = open(path, "wb")
            self._fh.write(struct.pack("<Q", len(hb)))
            self._fh.write(hb)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
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
        self._cur_nonfinite = 0
        return exp

    def write_at(self, offset: int, tensor: torch.Tensor) -> None:
        """Bytes of the current tensor at `offset` bytes from its start (any order).

        Every floating block is checked finite here, the one place all output passes: an
        overflow (a large `scale`, float16 output) must fail naming the tensor, not publish a
        checkpoint that answers NaN. The error is raised by `end()`, so that a caller that
        checks its inputs before ending the tensor names a NaN input file instead.
        """
        t = tensor.detach().to("cpu").contiguous()
        assert self._fh is not None
        if t.numel():
            # a NaN or Inf makes the sum non-finite (one pass, cheaper than isfinite on bf16);
            # so can an overflow of the sum alone, which the exact count then settles
            if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
                self._cur_nonfinite += int((~torch.isfinite(t)).sum())
            try:
                self._fh.seek(self._cur_start + offset)
                self._fh.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self._shard_path)) from None
            self._cur_written += t.numel() * t.element_size()

    def end(self) -> None:
        """Finish the current tensor: every byte must have been written exactly once."""
        exp = self.plan[self._pos]
        if self._cur_nonfinite:
            raise OutputError(
                f"tensor {exp.name!r}: the computed values contain {self._cur_nonfinite} NaN/Inf "
                f"value(s) in {exp.dtype} (overflow? check parameters.scale and dtype); nothing was "
                "written")
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
            fh, self._fh = self._fh, None
            try:
                fh.close()  # buffered bytes are written here: ENOSPC/EFBIG may surface now
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self._shard_path)) from None
        if self._pos != len(self.plan):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self.plan)} tensors")
        index = self.out_dir / SAFE_INDEX
        try:
            index.write_text(json.dumps({"metadata": {"total_size": self.total_size},
                                         "weight_map": self.weight_map}, indent=2) + "\n")
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(index)) from None
        return index

    def abort(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass  # already failing; the temp folder is removed by the caller


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


# -- publishing an output folder ---------------------------------------------------------------
#
# An output (merged checkpoint, extracted expert, router) is written into a temporary folder
# beside it, `.OUT.tmp-<pid>-<random>`, and published by one rename. The rules, because a
# merge tool that deletes a user's model is worse than one that fails:
#   - the rename fails if the target appeared meanwhile (renameat2 RENAME_NOREPLACE);
#   - `force` replaces only an empty folder or channelmerge's own previous output (the
#     caller's `own` check), swapped atomically (RENAME_EXCHANGE): the old one is removed only
#     after the new one is in place;
#   - a lock file `.OUT.lock` beside the output makes a second writer of the same output fail
#     instead of racing;
#   - temporary folders left by a killed process (its pid no longer runs) are swept by the
#     next writer into the same parent folder.
# Callers refuse outputs that overlap their inputs before any of this (`check_not_overlapping`).


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2_fn: Any = None
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2). False where the call or the flag is unsupported (other OS, old libc,
    a file system without it); True when done; OSError otherwise (EEXIST: target exists)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            except (OSError, AttributeError):
                pass
    if not _renameat2_fn:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists.

    Atomic with renameat2(RENAME_NOREPLACE) on Linux. Where that is unavailable it falls back
    to check-then-rename, which is NOT atomic: an empty folder created at `dst` between the
    check and the rename would be replaced (a non-empty one still makes the rename fail).
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out` (which exists) and the old `out` at `tmp`, atomically if possible."""
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        return
    # Fallback: old aside, new in. A crash between the two renames leaves the old output
    # under a temp name (swept later); never a half-written `out`.
    aside = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, aside)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    os.rename(aside, tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not checkable: keep its folder
    return True


def sweep_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove `.X.tmp-<pid>-*` folders in `parent` whose process no longer runs.

    A SIGKILL (or power loss) gives no chance to clean up; the next channelmerge writer into
    the same folder does it. Only this host's pids can be checked: a temp folder of a live
    process elsewhere on a shared file system whose pid is free here would be removed.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for ent in entries:
        m = _TMP_RE.match(ent.name)
        if not m or not ent.is_dir(follow_symlinks=False) or _pid_alive(int(m.group("pid"))):
            continue
        shutil.rmtree(ent.path, ignore_errors=True)
        if not os.path.lexists(ent.path):
            log.warning("removed %s, left behind by channelmerge process %s that no longer runs",
                        ent.path, m.group("pid"))
            removed.append(Path(ent.path))
    return removed


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `.OUT.lock` beside `out` (removed on exit).

    A second writer of the same output fails at once with OutputBusyError naming the holder's
    pid, instead of both running and one silently replacing the other.
    """
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the lock file {path.name} ({e.strerror})",
                          str(out.parent)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise OutputBusyError(
                f"{out}: another channelmerge process (pid {holder}) is writing it (lock {path}); "
                "wait for it to finish or stop it") from None
        # The previous holder may have unlinked the file between our open and flock: then we
        # hold a lock nobody else sees. Retry on the file that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence /proc first
    os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """The mode `mkdir` would give (0o777 minus the umask): mkdtemp's 0700 is for the temp
    folder only, a published checkpoint is shared like any other folder."""
    return 0o777 & ~_umask()


def replaceable_problem(path: Path, own: Optional[Callable[[Path], Optional[str]]]) -> Optional[str]:
    """None if `--force` may replace the existing `path`; else what `path` is.

    Replaceable: an empty folder, or a folder `own` recognises as channelmerge's previous
    output (it returns None for those, a description otherwise). Never a symlink or a file.
    """
    if os.path.islink(path):
        return f"is a symbolic link (to {os.readlink(path)})"
    if not path.is_dir():
        return "is a file, not a folder"
    try:
        if not any(os.scandir(path)):
            return None
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return own(path) if own is not None else "is not empty"


def check_replaceable(path: Path, own: Optional[Callable[[Path], Optional[str]]]) -> None:
    """Raise FileExistsError (one line) unless `--force` may replace the existing `path`."""
    problem = replaceable_problem(path, own)
    if problem is not None:
        raise FileExistsError(f"{path} {problem}; --force only replaces channelmerge's own output "
                              "(or an empty folder), so it was left alone")


def _unexpected_entries(d: Path, allowed: Callable[[str], bool]) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if not allowed(e.name))


def _extra_problem(d: Path, allowed: Callable[[str], bool], what: str) -> Optional[str]:
    extra = _unexpected_entries(d, allowed)
    if not extra:
        return None
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    return f"is {what} but also holds {extra[0]!r}{more}, which channelmerge did not write"


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _common_entry(name: str) -> bool:
    return (name in (fmt.CONFIG_FILE, fmt.INDEX_FILE, fmt.MODEL_CARD_FILE) or name in TOKENIZER_FILES
            or bool(_SHARD_RE.match(name)))


def _own_hidden(name: str, inner: str) -> bool:
    """Lock/temp entries a channelmerge writer of `inner` leaves inside a folder."""
    m = _TMP_RE.match(name)
    return name == f".{inner}.lock" or bool(m and m.group("name") == inner)


def merged_output_problem(d: Path) -> Optional[str]:
    """None if `d` is a merged checkpoint written by channelmerge (`channelmerge.yaml`, a
    channel_merged quantization_config, only the files a merge or `router train` writes)."""
    if not (d / fmt.MERGE_CONFIG_FILE).is_file():
        return f"is not a channelmerge merged checkpoint (no {fmt.MERGE_CONFIG_FILE})"
    method = _quant_method(d / fmt.CONFIG_FILE)
    if method != fmt.QUANT_METHOD:
        return (f"is not a channelmerge merged checkpoint ({fmt.CONFIG_FILE} quantization_config."
                f"quant_method is {method!r})")
    return _extra_problem(d, lambda n: _common_entry(n) or n in (fmt.MERGE_CONFIG_FILE, fmt.SIDECAR_DIR,
                                                                   fmt.ROUTER_DIR) or _own_hidden(n, fmt.ROUTER_DIR),
                          "a channelmerge merged checkpoint")


# Key of config.json in a dense expert written by `channelmerge extract`: marks the folder as
# channelmerge's own output (what `extract --force` may replace).
EXTRACT_MARKER = "channelmerge_extract"


def extract_output_problem(d: Path) -> Optional[str]:
    """None if `d` is a dense expert written by `channelmerge extract` (its config.json has the
    `channelmerge_extract` key, and only the files extract writes are there)."""
    cfg = _read_json_quiet(d / fmt.CONFIG_FILE)
    if not isinstance(cfg, dict) or not isinstance(cfg.get(EXTRACT_MARKER), dict):
        return (f"is not an expert extracted by channelmerge (no {EXTRACT_MARKER!r} in its "
                f"{fmt.CONFIG_FILE})")
    return _extra_problem(d, _common_entry, "an expert extracted by channelmerge")


def _read_json_quiet(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _quant_method(p: Path) -> Any:
    cfg = _read_json_quiet(p)
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _chain(p: str) -> list[tuple[str, Optional[tuple[int, int]]]]:
    """`p` and its ancestors, each with (st_dev, st_ino) where it exists."""
    out = []
    cur = p
    while True:
        try:
            st = os.stat(cur)
            ident: Optional[tuple[int, int]] = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        out.append((cur, ident))
        up = os.path.dirname(cur)
        if up == cur:
            return out
        cur = up


def overlap(out: str | Path, src: str | Path) -> Optional[str]:
    """How output `out` overlaps input `src`: "is", "contains" (out is an ancestor of src),
    "inside" (out is within src), or None.

    Paths are compared resolved (symlinks, `..`) and by device and inode, so a bind mount or
    a second path to the same folder is seen too.
    """
    o_chain = _chain(os.path.realpath(out))
    s_chain = _chain(os.path.realpath(src))
    (o_path, o_id), (s_path, s_id) = o_chain[0], s_chain[0]
    if o_path == s_path or (o_id is not None and o_id == s_id):
        return "is"
    if o_path in (p for p, _ in s_chain[1:]) or (o_id is not None and o_id in (i for _, i in s_chain[1:])):
        return "contains"
    if s_path in (p for p, _ in o_chain[1:]) or (s_id is not None and s_id in (i for _, i in o_chain[1:])):
        return "inside"
    return None


def check_not_overlapping(out: str | Path, inputs: list[tuple[str, str | Path]],
                          error: type[Exception], allow_inside: bool = False) -> None:
    """Refuse an output that is an input, an ancestor of one, or (unless `allow_inside`) inside
    one, `--force` or not. `inputs`: (what, path) pairs; `error`: the exception to raise."""
    for what, src in inputs:
        rel = overlap(out, src)
        if rel is None or (rel == "inside" and allow_inside):
            continue
        shown = f"{out}" + (f" (resolved: {os.path.realpath(out)})" if os.path.realpath(out) != str(out) else "")
        src_shown = f"{src}" + (f" (resolved: {os.path.realpath(src)})"
                                if os.path.realpath(src) != str(src) else "")
        verb = {"is": "would overwrite", "contains": "would overwrite",
                "inside": "would be written inside"}[rel]
        raise error(f"output folder {shown} {verb} {what} {src_shown}")


def _name_error(e: OSError, tmp: Path, out: Path) -> OSError:
    """The same OSError naming the published path instead of the temp folder (or `out` when
    the error named no file at all, e.g. ENOSPC or EFBIG from a write)."""
    if e.errno is None or not e.strerror:
        return e
    fname = e.filename
    if fname is None:
        fname = str(out)
    else:
        fname = str(fname)
        if fname == str(tmp) or fname.startswith(str(tmp) + os.sep):
            fname = str(out) + fname[len(str(tmp)):]
    return OSError(e.errno, e.strerror, fname)


@contextmanager
def staged_dir(out: Path, force: bool = False,
               own: Optional[Callable[[Path], Optional[str]]] = None) -> Iterator[Path]:
    """A temporary folder beside `out`, published as `out` only if the block succeeds.

    On any error (Ctrl-C and SIGTERM turned into exceptions included) the temporary folder is
    removed and `out` is untouched, so no half-written output is ever left behind. Without
    `force` an existing `out` (even one that appears while the block runs) is an error; with
    it, only an empty folder or one `own` accepts (None = channelmerge's own output) is
    replaced. OSErrors name the output path (one line for the CLI).
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(e.filename or out.parent)) from None
    with output_lock(out):
        sweep_stale_temp_dirs(out.parent)
        if os.path.lexists(out):
            if not force:
                raise FileExistsError(f"{out} already exists; pass force=True (--force) to overwrite it")
            check_replaceable(out, own)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(out.parent)) from None
        try:
            try:
                yield tmp
                os.chmod(tmp, default_dir_mode())
                fsync_dir(tmp)
                if force and os.path.lexists(out):
                    check_replaceable(out, own)  # again: it may have changed meanwhile
                    _swap_into_place(tmp, out)  # tmp now holds the old output
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    try:
                        rename_noreplace(tmp, out)
                    except FileExistsError:
                        raise FileExistsError(
                            f"{out} appeared while it was being written (another process?); it was "
                            "left alone and nothing was published") from None
                fsync_dir(out.parent)
            except OSError as e:
                raise _name_error(e, tmp, out) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
