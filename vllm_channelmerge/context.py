"""Per-engine runtime state, free of vLLM: which expert each row of the step in flight uses.

One :class:`EngineContext` per loaded model (the quantization config creates it, the model
and every layer method hold it): the checkpoint's config, the :class:`StepState` of the
forward in flight, the kernel strategy, the hot-expert cache and the dense GEMM backend
(:class:`~vllm_channelmerge.kernels.GemmFactory`). Nothing here imports vLLM,
so the rules it enforces (no step without expert ids, ids in batch order) are unit-tested
without an engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import numpy as np
import torch

from vllm_channelmerge import format as fmt
from vllm_channelmerge import kernels

STRATEGY_ENV = "CHANNELMERGE_STRATEGY"  # force one kernel strategy (tests, benchmarks)

MISSING_IDS = (
    "channelmerge: a forward step with scheduled tokens reached the model without expert ids, "
    "so nothing says which expert each token belongs to; refusing rather than answering with "
    "one expert. The plugin's runner hook is not in use: leave --worker-cls unset (the plugin "
    "sets it to vllm_channelmerge.compat.ChannelMerged{CPU,GPU}Worker), or subclass those "
    "workers; on Model Runner V2 the model's get_model_state_cls() must be used.")


def token_expert_ids(req_experts: np.ndarray, counts: np.ndarray, num_tokens: int) -> np.ndarray:
    """Per-token ids in batch order: request i's expert repeated counts[i] times, padded
    with expert 0 up to `num_tokens` (padding tokens of a padded batch belong to no request)."""
    ids = np.repeat(np.asarray(req_experts, dtype=np.int64), np.asarray(counts, dtype=np.int64))
    if ids.shape[0] > num_tokens:
        raise ValueError(f"{ids.shape[0]} scheduled tokens but the forward has {num_tokens}")
    if ids.shape[0] < num_tokens:
        ids = np.concatenate([ids, np.zeros(num_tokens - ids.shape[0], dtype=np.int64)])
    return ids


class StepState:
    """Expert ids of the forward step in flight.

    The model's forward calls :meth:`begin` with the per-token ids (and per-request ids, for
    the lm_head) that the runner adapter passed. ``None`` is accepted only inside
    :meth:`dummy_run` (the runner's profiling / warm-up runs: every token is expert 0);
    anywhere else it raises. Layers then ask for a :class:`~vllm_channelmerge.kernels.ExpertBatch`
    (built once per step and shared by all layers).

    The lm_head's rows come to :meth:`logits_rows` in one of two explicit forms, never
    told apart by guessing: one row per request (the sampled rows, batch order), or, inside
    :meth:`numbered_rows` (the runner's prompt-logprobs computation), slices of a tensor of
    row numbers that stands in for the step's hidden states.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = int(num_experts)
        self.token_ids: Optional[torch.Tensor] = None
        self.request_ids: Optional[torch.Tensor] = None
        self.dummy = True
        self.in_dummy_run = False
        self._token_batch: Optional[kernels.ExpertBatch] = None
        self.logits_batch: Optional[kernels.ExpertBatch] = None  # set around the lm_head call
        # Inside numbered_rows: the hidden states the row numbers point into; None outside.
        self._numbered: Optional[torch.Tensor] = None
        self.steps = 0

    @contextlib.contextmanager
    def dummy_run(self) -> Iterator[None]:
        """Marks a runner's dummy run: the model may then be called without expert ids."""
        prev, self.in_dummy_run = self.in_dummy_run, True
        try:
            yield
        finally:
            self.in_dummy_run = prev

    @property
    def in_numbered_rows(self) -> bool:
        return self._numbered is not None

    @contextlib.contextmanager
    def numbered_rows(self, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        """For the runner's prompt-logprobs computation: yields ``[T, 1]`` row numbers to hand
        vLLM in place of the step's hidden states ``[T, H]``. vLLM slices and chunks rows
        as it likes; every compute_logits call inside gets row numbers, which carry each row's
        own identity, so its hidden state and its token's expert are looked up, not inferred."""
        if self.dummy or self.token_ids is None:
            raise RuntimeError(MISSING_IDS)
        n = hidden_states.shape[0]
        if hidden_states.dim() != 2 or n > self.token_ids.shape[0]:
            raise RuntimeError(f"channelmerge: prompt logprobs over hidden states of shape "
                               f"{tuple(hidden_states.shape)}, but the step has {self.token_ids.shape[0]} tokens")
        prev, self._numbered = self._numbered, hidden_states
        try:
            yield torch.arange(n, device=hidden_states.device).unsqueeze(1)
        finally:
            self._numbered = prev

    def begin(self, token_ids: Optional[torch.Tensor], request_ids: Optional[torch.Tensor],
              num_tokens: int, device: torch.device) -> None:
        self.steps += 1
        self._token_batch = None
        if token_ids is None:
            if not self.in_dummy_run:
                raise RuntimeError(MISSING_IDS)
            self.dummy = True
            self.token_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
            self.request_ids = None
            return
        self.dummy = False
        t = token_ids.reshape(-1)[:num_tokens].to(device=device, dtype=torch.long)
        if t.shape[0] < num_tokens:
            t = torch.cat([t, t.new_zeros(num_tokens - t.shape[0])])
        self.token_ids = t
        self.request_ids = None if request_ids is None else request_ids.reshape(-1).to(device=device, dtype=torch.long)

    def token_batch(self, num_rows: int, device: torch.device) -> kernels.ExpertBatch:
        if self.token_ids is None or self.token_ids.shape[0] != num_rows:
            if self.token_ids is not None and not self.dummy:
                raise RuntimeError(
                    f"channelmerge: a layer got {num_rows} rows but the step has "
                    f"{self.token_ids.shape[0]} tokens; expert ids cannot be matched")
            self.begin(None, None, num_rows, device)
        if self._token_batch is None:
            self._token_batch = kernels.ExpertBatch.build(self.token_ids, self.num_experts)
        return self._token_batch

    def token_ids_for(self, num_rows: int, device: torch.device) -> torch.Tensor:
        return self.token_batch(num_rows, device).expert_ids

    def logits_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, kernels.ExpertBatch]:
        """The hidden-state rows that compute_logits was given, and their ExpertBatch.

        Inside :meth:`numbered_rows`: `rows` are row numbers ``[n, 1]`` -> those rows of the
        step's hidden states, with those tokens' experts. Otherwise: one row per request (the
        sampled rows, batch order) -> the requests' experts; a dummy step -> expert 0.
        Anything else is refused with the counts.
        """
        n = rows.shape[0]
        dev = rows.device
        if self._numbered is not None:
            if rows.dtype != torch.long or rows.dim() != 2 or rows.shape[1] != 1:
                raise RuntimeError(
                    f"channelmerge: prompt logprobs: compute_logits got rows of shape {tuple(rows.shape)} "
                    f"and dtype {rows.dtype}, not the row numbers the plugin handed the runner; "
                    "their expert cannot be known")
            idx = rows[:, 0]
            return self._numbered[idx], kernels.ExpertBatch.build(self.token_ids[idx], self.num_experts)
        if self.dummy or self.token_ids is None:
            if not (self.dummy and self.token_ids is not None) and not self.in_dummy_run:
                raise RuntimeError(MISSING_IDS)
            return rows, kernels.ExpertBatch.build(torch.zeros(n, dtype=torch.long, device=dev), self.num_experts)
        if self.request_ids is None or self.request_ids.shape[0] != n:
            raise RuntimeError(
                f"channelmerge: compute_logits got {n} rows but the step has "
                f"{0 if self.request_ids is None else self.request_ids.shape[0]} requests and "
                f"{self.token_ids.shape[0]} tokens; only one row per request is known (prompt "
                "logprobs come through the runner's own call; speculative decoding is not supported)")
        return rows, kernels.ExpertBatch.build(self.request_ids, self.num_experts)


def _strategy_from_env() -> str:
    s = os.environ.get(STRATEGY_ENV, "") or "auto"
    if s != "auto" and s not in kernels.STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV}={s!r}; expected auto or one of {', '.join(kernels.STRATEGIES)}")
    return s


def _hot_cache_from_env() -> Optional[kernels.HotExpertCache]:
    cache = kernels.HotExpertCache.from_env()  # $CHANNELMERGE_HOT_CACHE_BYTES, default 0: off
    return cache if cache.budget_bytes > 0 else None


class EngineContext:
    """Everything one loaded model shares across its layers (no module globals)."""

    def __init__(self, cm: fmt.ChannelMergedConfig, strategy: Optional[str] = None,
                 hot_cache: Optional[kernels.HotExpertCache] = None, from_env: bool = True,
                 gemm: Optional[kernels.GemmFactory] = None) -> None:
        self.cm = cm
        self.step = StepState(cm.num_experts)
        self.strategy = strategy or (_strategy_from_env() if from_env else "auto")
        self.hot_cache = hot_cache if hot_cache is not None or not from_env else _hot_cache_from_env()
        # How the kernels run a dense GEMM on a weight they hold (prepacked at load): plain
        # F.linear here; the vLLM adapter passes vLLM's own CPU GEMM (compat.cpu_gemm_factory).
        self.gemm = gemm if gemm is not None else kernels.TORCH_GEMM

    @property
    def experts(self) -> list[str]:
        return self.cm.experts
