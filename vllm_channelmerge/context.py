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
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = int(num_experts)
        self.token_ids: Optional[torch.Tensor] = None
        self.request_ids: Optional[torch.Tensor] = None
        self.dummy = True
        self.in_dummy_run = False
        self.hidden: Optional[torch.Tensor] = None  # last forward's output (prompt-logprob views)
        self._token_batch: Optional[kernels.ExpertBatch] = None
        self._row_batches: dict = {}
        self.logits_batch: Optional[kernels.ExpertBatch] = None  # set around the lm_head call
        # Inside a runner's prompt-logprobs computation: {first row of a request in the step's
        # hidden states: that request's expert}, as the runner gave them; None outside.
        self.prompt_logprob_rows: Optional[dict[int, int]] = None
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
    def in_prompt_logprobs(self) -> bool:
        return self.prompt_logprob_rows is not None

    @contextlib.contextmanager
    def prompt_logprobs_call(self, request_rows: dict[int, int]) -> Iterator[None]:
        """The runner's prompt-logprobs computation, with each request's first row in the step
        and its expert (explicit, from the runner): every compute_logits call inside it must get
        a slice that starts at one of those rows, and its rows get that request's expert."""
        prev, self.prompt_logprob_rows = self.prompt_logprob_rows, dict(request_rows)
        try:
            yield
        finally:
            self.prompt_logprob_rows = prev

    def begin(self, token_ids: Optional[torch.Tensor], request_ids: Optional[torch.Tensor],
              num_tokens: int, device: torch.device) -> None:
        self.steps += 1
        self._token_batch = None
        self._row_batches = {}
        self.hidden = None
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

    def rows_batch(self, hidden_states: torch.Tensor) -> kernels.ExpertBatch:
        """ExpertBatch for the rows given to compute_logits.

        Inside the runner's prompt-logprobs computation (:meth:`prompt_logprobs_call`): a slice of
        the step's hidden states that starts at a request's first row -> that request's expert,
        as the runner gave it (and the step's own token ids must agree). Otherwise: one row per
        request (the sampled rows, batch order) -> the requests' ids; a slice of the hidden
        states (a runner that does not mark its prompt-logprobs calls, V2) -> those tokens' ids;
        a dummy step -> expert 0. Anything else is refused.
        """
        n = hidden_states.shape[0]
        dev = hidden_states.device
        if self.dummy or self.token_ids is None:
            if not (self.dummy and self.token_ids is not None) and not self.in_dummy_run:
                raise RuntimeError(MISSING_IDS)
            return kernels.ExpertBatch.build(torch.zeros(n, dtype=torch.long, device=dev), self.num_experts)
        off = self._view_offset(hidden_states)
        if off is not None and off + n > self.token_ids.shape[0]:
            off = None
        if self.prompt_logprob_rows is not None:
            expert = None if off is None else self.prompt_logprob_rows.get(off)
            if expert is None or bool((self.token_ids[off: off + n] != expert).any()):
                raise RuntimeError(
                    f"channelmerge: prompt logprobs: compute_logits got {n} rows that are not a slice "
                    "of this step's hidden states starting at a request's first token (or their "
                    "token ids disagree with the request); their expert cannot be known")
            ids = torch.full((n,), expert, dtype=torch.long, device=dev)
        elif off is not None:
            ids = self.token_ids[off: off + n]
        elif self.request_ids is not None and self.request_ids.shape[0] == n:
            ids = self.request_ids
        else:
            raise RuntimeError(
                f"channelmerge: compute_logits got {n} rows but the step has "
                f"{0 if self.request_ids is None else self.request_ids.shape[0]} requests and "
                f"{self.token_ids.shape[0]} tokens (speculative decoding is not supported)")
        key = (off, n) if off is not None else ("req", n)
        b = self._row_batches.get(key)
        if b is None:
            b = self._row_batches[key] = kernels.ExpertBatch.build(ids, self.num_experts)
        return b

    def _view_offset(self, h: torch.Tensor) -> Optional[int]:
        """Row offset of `h` inside the last forward's hidden states, if it is a view of them
        (vLLM slices them for a request's prompt logprobs)."""
        base = self.hidden
        if base is None or h.dim() != 2 or base.dim() != 2 or h.shape[1] != base.shape[1]:
            return None
        if h.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            return None
        if h.stride() != base.stride():
            return None
        delta = h.storage_offset() - base.storage_offset()
        if delta < 0 or delta % base.stride(0):
            return None
        return delta // base.stride(0)


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
