"""Shared fixtures: tiny synthetic model families (built once per session, lazily)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

logging.getLogger("merge_tool").setLevel(logging.WARNING)


@dataclass
class Family:
    """A tiny base model and its experts (HF folders), with the true channel groups."""

    root: Path
    arch: str
    base: Path
    experts: dict[str, Path]
    tied: bool

    def config(self, **kw: Any) -> dict[str, Any]:
        """A merge config dict for this family (override any field with keywords)."""
        d: dict[str, Any] = {
            "base_model": str(self.base),
            "experts": [{"name": n, "model": str(p)} for n, p in self.experts.items()],
            "num_groups": 2,
        }
        d.update(kw)
        return d

    def merge_config(self, **kw: Any):
        from merge_tool.config import parse_config

        return parse_config(self.config(**kw))


def _family(tmp_path_factory: pytest.TempPathFactory, arch: str, names: list[str], tied: bool = False,
            **kw: Any) -> Family:
    from merge_tool.synthetic import make_family

    root = tmp_path_factory.mktemp(f"fam_{arch}{'_tied' if tied else ''}")
    base, experts = make_family(root, names, arch=arch, tie_word_embeddings=tied, **kw)
    return Family(root, arch, base, experts, tied)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """4 experts, 2 true groups per channel, untied Llama (hidden 128, head_dim 64)."""
    return _family(tmp_path_factory, "llama", ["math", "code", "chat", "zh"])


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return _family(tmp_path_factory, "mistral", ["a", "b", "c"])


@pytest.fixture(scope="session")
def qwen2_tied_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Qwen2 (q/k/v biases) with tied embeddings, 3 experts."""
    return _family(tmp_path_factory, "qwen2", ["a", "b", "c"], tied=True)


@pytest.fixture(scope="session")
def merged_llama_k2(llama_family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama family merged at K=2 with defaults (shared by read-only tests)."""
    from merge_tool.merge import run_merge

    out = tmp_path_factory.mktemp("merged") / "llama_k2"
    return run_merge(llama_family.merge_config(), out, progress=False)


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def leftovers():
    """`leftovers(parent, name)`: what a failed write left at `parent/name` or beside it."""
    return _leftovers
