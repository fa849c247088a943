"""Unit tests of the vLLM adapter's pieces with small fakes (no engine): admission, the V1
runner and V2 model-state id builders, the step state's rows, and expert-norm loading."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vllm_channelmerge import compat
from vllm_channelmerge import format as fmt
from vllm_channelmerge.context import StepState, token_expert_ids

EXPERTS = ["math", "code", "chat"]
CM = fmt.ChannelMergedConfig(experts=list(EXPERTS), num_groups=2)


def _params(extra):
    return types.SimpleNamespace(extra_args=extra)


# --- admission ------------------------------------------------------------------------------------

def test_admission_resolves_once_into_an_index():
    idx, extra = compat.admit(CM, _params({"expert": "chat", "other": 1}))
    assert idx == 2 and extra == {"expert": "chat", "other": 1, compat.EXPERT_INDEX_KEY: 2}
    # A client cannot pick an expert through the private key: admission overwrites it.
    idx, extra = compat.admit(CM, _params({"expert": "code", compat.EXPERT_INDEX_KEY: 2}))
    assert idx == 1 and extra[compat.EXPERT_INDEX_KEY] == 1
    with pytest.raises(fmt.ExpertRequestError, match="names no expert"):
        compat.admit(CM, _params(None))
    with_default = fmt.ChannelMergedConfig(experts=list(EXPERTS), num_groups=2, default_expert="chat")
    assert compat.admit(with_default, _params(None))[0] == 2


@pytest.mark.parametrize("bad", [None, {}, {compat.EXPERT_INDEX_KEY: 3}, {compat.EXPERT_INDEX_KEY: True},
                                 {compat.EXPERT_INDEX_KEY: "1"}, {"expert": "math"}])
def test_worker_refuses_a_request_that_was_not_admitted(bad):
    with pytest.raises(RuntimeError, match="not admitted"):
        compat.admitted_expert(_params(bad), len(EXPERTS))


def test_token_expert_ids_batch_order_and_padding():
    ids = token_expert_ids(np.array([2, 0, 1]), np.array([1, 3, 2]), 8)
    assert ids.tolist() == [2, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        token_expert_ids(np.array([0]), np.array([5]), 4)


# --- step state ---------------------------------------------------------------------------------------

def test_step_state_tokens_and_rows():
    st = StepState(3)
    with st.dummy_run():  # profiling run: no ids -> expert 0 everywhere
        st.begin(None, None, 5, torch.device("cpu"))
        assert st.token_batch(5, torch.device("cpu")).expert_ids.tolist() == [0] * 5
        rows = torch.zeros(7, 4)
        out, batch = st.logits_rows(rows)
        assert out is rows and batch.expert_ids.tolist() == [0] * 7
    # Real step: 2 requests (experts 2, 1) with 3 and 1 tokens.
    st.begin(torch.tensor([2, 2, 2, 1]), torch.tensor([2, 1]), 4, torch.device("cpu"))
    assert st.token_batch(4, torch.device("cpu")).expert_ids.tolist() == [2, 2, 2, 1]
    with pytest.raises(RuntimeError, match="rows"):
        st.token_batch(3, torch.device("cpu"))
    # Sampled rows (one per request, batch order) -> the requests' experts.
    sampled = torch.randn(2, 8)
    out, batch = st.logits_rows(sampled)
    assert out is sampled and batch.expert_ids.tolist() == [2, 1]


def test_rows_that_are_not_one_per_request_are_refused():
    """No guessing: outside the runner's prompt-logprobs call only one row per request is
    known; even a slice of the hidden states, or as many rows as tokens, is refused."""
    st = StepState(3)
    st.begin(torch.tensor([2, 2, 0, 1]), torch.tensor([2, 0, 1]), 4, torch.device("cpu"))
    hidden = torch.randn(4, 8)
    for rows in (hidden, hidden[1:3], torch.randn(5, 8)):
        with pytest.raises(RuntimeError, match="only one row per request is known"):
            st.logits_rows(rows)


def test_numbered_rows_carry_each_rows_own_token():
    """Inside numbered_rows the runner gets row numbers; whatever slice, gather or chunk of
    them reaches compute_logits is mapped back to those rows' hidden states and experts,
    across request boundaries too; anything that is not row numbers is refused."""
    st = StepState(3)
    st.begin(torch.tensor([2, 2, 0, 1, 1]), torch.tensor([2, 0, 1]), 5, torch.device("cpu"))
    hidden = torch.randn(4, 8)  # fewer rows than tokens (a runner may trim padding)
    with st.numbered_rows(hidden) as rows:
        assert st.in_numbered_rows
        assert rows.dtype == torch.long and rows.tolist() == [[0], [1], [2], [3]]
        out, batch = st.logits_rows(rows[1:4])  # crosses from the first request into the next two
        assert torch.equal(out, hidden[1:4]) and batch.expert_ids.tolist() == [2, 0, 1]
        out, batch = st.logits_rows(rows[torch.tensor([3, 0])])
        assert torch.equal(out, hidden[torch.tensor([3, 0])]) and batch.expert_ids.tolist() == [1, 2]
        for bad in (hidden[0:2], rows[:, 0], rows.float()):
            with pytest.raises(RuntimeError, match="not the row numbers"):
                st.logits_rows(bad)
    assert not st.in_numbered_rows
    with pytest.raises(RuntimeError, match="only one row per request"):
        st.logits_rows(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="the step has 5 tokens"):
        with st.numbered_rows(torch.randn(6, 8)):
            pass
    with pytest.raises(RuntimeError, match="without expert ids"):
        with StepState(3).numbered_rows(hidden):
            pass


def test_rows_without_any_forward_are_refused():
    with pytest.raises(RuntimeError, match="without expert ids"):
        StepState(3).logits_rows(torch.zeros(2, 4))


# --- compute_logits and the lm_head (fake stock model) ------------------------------------------

VOCAB = 4


class _StockLogits:
    """Stands in for vLLM's model: its lm_head reads the ExpertBatch the wrapper set, as the
    real one (layers.lm_head) does. logits[r, :] = h[r, 0] + 100 * expert(r)."""

    def compute_logits(self, hidden_states):
        experts = self.cm_ctx.step.logits_batch.expert_ids
        return (hidden_states[:, :1] + 100.0 * experts[:, None]).expand(-1, VOCAB).clone()


class _LogitsModel(compat.ChannelMergedModelMixin, _StockLogits):
    def __init__(self, step):
        self.cm_ctx = types.SimpleNamespace(step=step)
        self.cm_expert_norm = None


def _want_logits(hidden, experts):
    return hidden[:, 0] + 100.0 * torch.tensor(experts, dtype=hidden.dtype)


def test_compute_logits_local_and_a_stray_lm_head_call_are_refused():
    """Batch-sharded sampling's compute_logits_local (rows in rank-owner order) and an lm_head
    reached outside compute_logits both have rows of unknown experts: both refuse."""
    from vllm_channelmerge import kernels, layers

    st = StepState(2)
    st.begin(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="batch-sharded"):
        _LogitsModel(st).compute_logits_local(torch.randn(2, 8))
    ctx = types.SimpleNamespace(step=st, strategy="auto")
    state = types.SimpleNamespace()  # never reached: the refusal comes first
    with pytest.raises(RuntimeError, match="outside the model's compute_logits"):
        layers.lm_head(ctx, state, torch.randn(2, 8), None)
    st.logits_batch = kernels.ExpertBatch.build(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(RuntimeError, match="got 2 rows but compute_logits resolved 3"):
        layers.lm_head(ctx, state, torch.randn(2, 8), None)


def test_batch_sharded_sampling_is_refused_at_start_up():
    pc = types.SimpleNamespace(enable_batch_sharded_sampling=True, pipeline_parallel_size=1,
                               data_parallel_size=1)
    with pytest.raises(ValueError, match="batch-sharded sampling"):
        compat.check_parallel_config(pc)
    compat.check_parallel_config(types.SimpleNamespace(enable_batch_sharded_sampling=False,
                                                       pipeline_parallel_size=1, data_parallel_size=1))


# --- V1 runner adapter (fake runner) ------------------------------------------------------------------

class _FakeRunnerBase:
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        self.seen = kw
        return "out"

    def _dummy_run(self, n):
        return self.model.cm_ctx.step.in_dummy_run



class _FakeV1Runner(compat.ExpertIdsV1Mixin, _FakeRunnerBase):
    def __init__(self, reqs: dict[str, int], order: list[str], counts: list[int]):
        self.model = types.SimpleNamespace(cm_config=CM, cm_ctx=types.SimpleNamespace(step=StepState(3)))
        self.requests = {r: types.SimpleNamespace(sampling_params=_params({compat.EXPERT_INDEX_KEY: e}))
                         for r, e in reqs.items()}
        self.input_batch = types.SimpleNamespace(num_reqs=len(order), req_ids=order,
                                                 req_id_to_index={r: i for i, r in enumerate(order)})
        qsl = np.zeros(len(order) + 1, dtype=np.int32)
        qsl[1:] = np.cumsum(counts)
        self.query_start_loc = types.SimpleNamespace(np=qsl)


def test_v1_adapter_builds_ids_in_batch_order():
    r = _FakeV1Runner({"a": 1, "b": 0, "c": 2}, ["c", "a", "b"], [2, 1, 3])
    assert r._model_forward(input_ids=torch.zeros(8, dtype=torch.long)) == "out"
    assert r.seen["expert_ids"].tolist() == [2, 2, 1, 0, 0, 0, 0, 0]
    assert r.seen["request_expert_ids"].tolist() == [2, 1, 0]
    # Next step: the batch was condensed and reordered; ids follow the new order.
    r.input_batch = types.SimpleNamespace(num_reqs=2, req_ids=["a", "c"])
    r.query_start_loc = types.SimpleNamespace(np=np.array([0, 1, 2]))
    r._model_forward(input_ids=torch.zeros(2, dtype=torch.long))
    assert r.seen["expert_ids"].tolist() == [1, 2]


def test_v1_adapter_marks_dummy_runs_only():
    r = _FakeV1Runner({}, [], [])
    assert r._dummy_run(4) is True
    assert r.model.cm_ctx.step.in_dummy_run is False


class _GatherSampler:
    """The sampler's gather_logprobs, without its compiled rank kernel (ranks unused here)."""

    @staticmethod
    def gather_logprobs(scores, k, token_ids):
        got = scores.gather(-1, token_ids.unsqueeze(-1))
        return token_ids.unsqueeze(-1).to(torch.int32), got, torch.zeros(len(token_ids), dtype=torch.long)


def test_v1_prompt_logprobs_rows_get_their_own_tokens_experts():
    """vLLM's own V1 ``_get_prompt_logprobs_dict`` (slices one request's rows per
    compute_logits call), run through the adapter: every prompt row is scored by its own
    request's expert, in a batch whose order differs from the requests' arrival."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class Base:
        _get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict

        def _sync_device(self):
            pass

    class Runner(compat.ExpertIdsV1Mixin, Base):
        pass

    experts = {"a": 1, "b": 0, "c": 2}
    order, counts = ["c", "a", "b"], [2, 3, 3]  # c decodes (2 rows here), a and b prefill
    st = StepState(3)
    st.begin(torch.tensor([2, 2, 1, 1, 1, 0, 0, 0]), torch.tensor([2, 1, 0]), 8, torch.device("cpu"))
    r = Runner()
    r.model = _LogitsModel(st)
    r.model_config = types.SimpleNamespace(logprobs_mode="raw_logits")
    r.sampler = _GatherSampler()
    r.device = torch.device("cpu")
    r.input_batch = types.SimpleNamespace(req_id_to_index={x: i for i, x in enumerate(order)})
    r.query_start_loc = types.SimpleNamespace(np=np.array([0, 2, 5, 8]))
    r.requests = {x: types.SimpleNamespace(prompt_token_ids=[0] * 3, num_computed_tokens=0,
                                           in_progress_prompt_logprobs_cpu=None) for x in experts}
    r.num_prompt_logprobs = {"a": 0, "b": 0}
    hidden = torch.arange(8.0).unsqueeze(1).expand(-1, 4).contiguous()
    out = r._get_prompt_logprobs_dict(hidden, {"c": 2, "a": 3, "b": 3})
    # Whole 3-token prompts: each completes this step with 2 scored rows (the last predicts
    # the first output token).
    assert set(out) == {"a", "b"}
    assert out["a"].logprobs[:, 0].tolist() == _want_logits(hidden[2:4], [1, 1]).tolist()
    assert out["b"].logprobs[:, 0].tolist() == _want_logits(hidden[5:7], [0, 0]).tolist()
    assert not st.in_numbered_rows
    assert r._get_prompt_logprobs_dict(hidden, {"c": 2}) == {}  # none asked: vLLM's early return


# --- V2 prompt logprobs (vLLM's own PromptLogprobsWorker) -------------------------------------------

def _v2_prompt_worker(monkeypatch, chunk: int):
    pl = pytest.importorskip("vllm.v1.worker.gpu.sample.prompt_logprob")
    from vllm.v1.outputs import LogprobsTensors

    # Small chunks, so chunks cross request boundaries. The two Triton pieces (the prompt's
    # next-token ids and the ranks) have no CPU backend; the chunking under test is vLLM's own.
    monkeypatch.setattr(pl, "CHUNK_SIZE", chunk)
    monkeypatch.setattr(pl, "get_prompt_logprobs_token_ids",
                        lambda num_tokens, *a: torch.zeros(num_tokens, dtype=torch.long))

    def topk_scores(logits, num, token_ids, logits_mode=False):
        assert logits_mode
        ids = token_ids.unsqueeze(-1)
        return LogprobsTensors(ids, logits.gather(-1, ids).float(), torch.zeros(len(ids), dtype=torch.long))

    monkeypatch.setattr(pl, "compute_topk_scores", topk_scores)
    return pl.PromptLogprobsWorker(4, torch.device("cpu"), logprobs_mode="raw_logits")


def _v2_step(order, experts, counts):
    qsl = np.concatenate([[0], np.cumsum(counts)])
    ids = torch.tensor(np.repeat([experts[x] for x in order], counts))
    st = StepState(3)
    st.begin(ids, torch.tensor([experts[x] for x in order]), int(qsl[-1]), torch.device("cpu"))
    batch = types.SimpleNamespace(
        req_ids=order, idx_mapping_np=np.arange(len(order)), idx_mapping=torch.arange(len(order)),
        num_computed_prefill_tokens_np=np.zeros(len(order), dtype=np.int64),
        prefill_len_np=np.array(counts), num_scheduled_tokens=np.array(counts),
        num_tokens=int(qsl[-1]), query_start_loc=torch.tensor(qsl), query_start_loc_np=qsl)
    return st, batch, ids


def test_v2_prompt_logprobs_chunks_across_requests_get_each_rows_expert(monkeypatch):
    """vLLM's V2 ``compute_prompt_logprobs`` cuts the whole step into fixed-size chunks that
    cross request boundaries; marked by the adapter, each row is scored by its own expert."""
    worker = _v2_prompt_worker(monkeypatch, chunk=3)
    order, experts, counts = ["a", "b", "c"], {"a": 2, "b": 0, "c": 1}, [4, 2, 5]
    st, batch, ids = _v2_step(order, experts, counts)
    compat.mark_prompt_logprobs_worker(worker, st)
    assert isinstance(worker, compat.PromptRowsV2Mixin)
    for i, x in enumerate(order):
        worker.add_request(x, i, types.SimpleNamespace(prompt_logprobs=0, prompt_logprob_token_ids=None))
    hidden = torch.arange(11.0).unsqueeze(1).expand(-1, 4).contiguous()
    model = _LogitsModel(st)
    out = worker.compute_prompt_logprobs(model.compute_logits, hidden, batch, None, None, np.array(counts))
    qsl = batch.query_start_loc_np
    for i, x in enumerate(order):
        rows = slice(int(qsl[i]), int(qsl[i + 1]) - 1)  # the last prompt row predicts a decode token
        want = _want_logits(hidden[rows], [experts[x]] * (rows.stop - rows.start))
        assert out[x].logprobs[:, 0].tolist() == want.tolist(), x
    assert not st.in_numbered_rows
    # Unmarked, the same chunks reach compute_logits as plain hidden states: refused, not guessed.
    plain = _v2_prompt_worker(monkeypatch, chunk=3)
    for i, x in enumerate(order):
        plain.add_request(x, i, types.SimpleNamespace(prompt_logprobs=0, prompt_logprob_token_ids=None))
    with pytest.raises(RuntimeError, match="only one row per request"):
        plain.compute_prompt_logprobs(model.compute_logits, hidden, batch, None, None, np.array(counts))


def test_v2_prompt_token_id_logprobs_get_each_rows_expert(monkeypatch):
    """The V2 fixed-token-ids path (per-request slices, chunked) through the adapter."""
    worker = _v2_prompt_worker(monkeypatch, chunk=2)
    order, experts, counts = ["a", "b"], {"a": 1, "b": 2}, [5, 3]
    st, batch, ids = _v2_step(order, experts, counts)
    compat.mark_prompt_logprobs_worker(worker, st)
    for i, x in enumerate(order):
        worker.add_request(x, i, types.SimpleNamespace(prompt_logprobs=None, prompt_logprob_start=0,
                                                       prompt_logprob_token_ids=np.zeros((counts[i] - 1, 1), np.int64)))
    hidden = torch.arange(8.0).unsqueeze(1).expand(-1, 4).contiguous()
    out = worker.compute_prompt_token_id_logprobs(_LogitsModel(st).compute_logits, hidden, batch, np.array(counts))
    assert out["a"][:, 0].tolist() == _want_logits(hidden[0:4], [1] * 4).tolist()
    assert out["b"][:, 0].tolist() == _want_logits(hidden[5:7], [2] * 2).tolist()


def test_v2_runner_marks_its_prompt_logprobs_worker_after_load():
    """After load_model the V2 runner's prompt-logprobs worker is subclassed in place. (A vLLM
    that renamed the attribute would go unmarked; its prompt-logprobs rows would then be
    refused by compute_logits, as the unmarked case above shows, never guessed.)"""

    class Worker:
        pass

    class Base:
        def load_model(self):
            self.model = _LogitsModel(StepState(2))
            self.prompt_logprobs_worker = Worker()
            return "loaded"

    class Runner(compat.ExpertRowsV2RunnerMixin, Base):
        pass

    r = Runner()
    assert r.load_model() == "loaded"
    assert isinstance(r.prompt_logprobs_worker, compat.PromptRowsV2Mixin)
    assert r.prompt_logprobs_worker.cm_step is r.model.cm_ctx.step


# --- V2 model state (fake DefaultModelState) ----------------------------------------------------------

class _FakeDefaultModelState:
    def __init__(self, vllm_config, model, encoder_cache, device):
        self.max_num_reqs = 4
        self.max_num_tokens = 16

    def add_request(self, req_index, new_req_data):
        pass

    def prepare_inputs(self, input_batch, req_states):
        return {"other": 1}

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        return {}


def _new_req(idx):
    return types.SimpleNamespace(sampling_params=_params(None if idx is None else {compat.EXPERT_INDEX_KEY: idx}))


def test_v2_model_state_slots_and_padding():
    cls = compat.make_model_state_cls(_FakeDefaultModelState)
    st = cls(None, types.SimpleNamespace(cm_config=CM), None, torch.device("cpu"))
    st.add_request(3, _new_req(2))
    st.add_request(0, _new_req(1))
    st.add_request(1, _new_req(0))
    batch = types.SimpleNamespace(num_reqs=3, idx_mapping=torch.tensor([3, 1, 0]),
                                  num_scheduled_tokens=np.array([2, 1, 3]), num_tokens=6,
                                  num_tokens_after_padding=8)
    out = st.prepare_inputs(batch, None)
    assert out["other"] == 1
    assert out["expert_ids"].tolist() == [2, 2, 0, 1, 1, 1, 0, 0]
    assert out["request_expert_ids"].tolist() == [2, 0, 1]
    buf = out["expert_ids"].data_ptr()
    dummy = st.prepare_dummy_inputs(2, 5)
    assert dummy["expert_ids"].tolist() == [0] * 5
    assert dummy["expert_ids"].data_ptr() == buf  # persistent buffer (CUDA graphs read it)
    with pytest.raises(RuntimeError, match="not admitted"):
        st.add_request(2, _new_req(None))


def test_v2_warm_up_requests_get_expert_0_during_the_workers_warm_up_only(monkeypatch):
    """vLLM's V2 kernel warm-up schedules requests of its own (never admitted): the model
    state gives them expert 0 inside the worker's compile_or_warm_up_model, and refuses an
    unadmitted request everywhere else."""
    cls = compat.make_model_state_cls(_FakeDefaultModelState)
    st = cls(None, types.SimpleNamespace(cm_config=CM), None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="not admitted"):
        st.add_request(0, _new_req(None))
    with compat.v2_warm_up(st):
        st.add_request(0, _new_req(None))
        st.add_request(1, _new_req(2))  # an admitted one keeps its expert
    assert st.cm_slot_expert[:2].tolist() == [0, 2]
    with pytest.raises(RuntimeError, match="not admitted"):
        st.add_request(0, _new_req(None))

    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu_worker import Worker

    seen = []
    monkeypatch.setattr(Worker, "compile_or_warm_up_model",
                        lambda self: seen.append(getattr(self.model_runner, "model_state", None)
                                                 and self.model_runner.model_state.cm_warm_up) or "times")
    w = object.__new__(compat._gpu_worker_cls())
    w.model_runner = types.SimpleNamespace(model_state=st)
    assert w.compile_or_warm_up_model() == "times" and seen == [True] and st.cm_warm_up is False
    w.model_runner = types.SimpleNamespace()  # V1 runner: no model state, nothing to mark
    assert w.compile_or_warm_up_model() == "times" and seen == [True, None]


# --- expert norm loading ----------------------------------------------------------------------

def test_expert_norm_is_loaded_and_checked():
    """`model.norm.expert_weight` goes to the wrapper's own parameter, never to vLLM's loader;
    a missing or misshapen one is a FormatError naming the tensor, and so is an int weight."""

    class Stock(torch.nn.Module):  # stands in for vLLM's LlamaForCausalLM
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
            self.config = types.SimpleNamespace(tie_word_embeddings=True)

        def load_weights(self, weights):
            names = set()
            for n, t in weights:
                assert n == "w", f"vLLM's loader got {n}"
                names.add(n)
            return names

    class Wrapped(compat.ChannelMergedModelMixin, Stock):
        def __init__(self):
            super().__init__()
            self.cm_config = fmt.ChannelMergedConfig(experts=["a", "b"], num_groups=2, expert_norms=["model.norm"])
            self.cm_expert_norm = torch.nn.Parameter(torch.ones(2, 4), requires_grad=False)

    m = Wrapped()
    norm = torch.arange(8.0).reshape(2, 4)
    assert m.load_weights([("w", torch.ones(3)), ("model.norm.expert_weight", norm)]) == {"w", "cm_expert_norm"}
    assert torch.equal(m.cm_expert_norm.data, norm)
    with pytest.raises(fmt.FormatError, match="'model.norm.expert_weight' is missing"):
        Wrapped().load_weights([("w", torch.ones(3))])
    with pytest.raises(fmt.FormatError, match=r"'model.norm.expert_weight' has shape \(3, 4\)"):
        Wrapped().load_weights([("w", torch.ones(3)), ("model.norm.expert_weight", torch.ones(3, 4))])
    with pytest.raises(fmt.FormatError, match="'w' is torch.int32"):
        Wrapped().load_weights([("w", torch.ones(3, dtype=torch.int32))])
