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
        assert st.rows_batch(torch.zeros(7, 4)).expert_ids.tolist() == [0] * 7
    # Real step: 2 requests (experts 2, 1) with 3 and 1 tokens.
    st.begin(torch.tensor([2, 2, 2, 1]), torch.tensor([2, 1]), 4, torch.device("cpu"))
    assert st.token_batch(4, torch.device("cpu")).expert_ids.tolist() == [2, 2, 2, 1]
    with pytest.raises(RuntimeError, match="rows"):
        st.token_batch(3, torch.device("cpu"))
    hidden = torch.randn(4, 8)
    st.hidden = hidden
    # Sampled rows (a gather, one per request) -> request ids.
    assert st.rows_batch(hidden[torch.tensor([2, 3])]).expert_ids.tolist() == [2, 1]
    # A slice of the hidden states (prompt logprobs) -> those tokens' ids.
    assert st.rows_batch(hidden[1:4]).expert_ids.tolist() == [2, 2, 1]
    with pytest.raises(RuntimeError, match="speculative"):
        st.rows_batch(torch.randn(3, 8))


def test_rows_that_match_nothing_explicitly_are_refused():
    """No guessing: rows that are neither one per request nor a slice of the step's hidden
    states are refused, even when their count equals the step's tokens; inside a marked
    prompt-logprobs call (the V1 runner marks them) only a slice is accepted, even when the
    rows happen to be as many as the requests."""
    st = StepState(3)
    st.begin(torch.tensor([2, 2, 0, 1]), torch.tensor([2, 0, 1]), 4, torch.device("cpu"))
    st.hidden = hidden = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="4 rows"):
        st.rows_batch(torch.randn(4, 8))  # a copy with as many rows as tokens: which tokens?
    with st.prompt_logprobs_call({0: 2, 2: 0}):  # requests starting at rows 0 and 2
        assert st.rows_batch(hidden[0:2]).expert_ids.tolist() == [2, 2]
        assert st.rows_batch(hidden[2:3]).expert_ids.tolist() == [0]
        with pytest.raises(RuntimeError, match="prompt logprobs"):
            st.rows_batch(hidden[torch.tensor([0, 2, 3])])  # 3 rows = 3 requests, but not a slice
        with pytest.raises(RuntimeError, match="prompt logprobs"):
            st.rows_batch(hidden[1:3])  # starts inside a request
    with st.prompt_logprobs_call({0: 1}):  # the runner's expert disagrees with the step's ids
        with pytest.raises(RuntimeError, match="disagree"):
            st.rows_batch(hidden[0:2])
    assert st.rows_batch(hidden[torch.tensor([1, 2, 3])]).expert_ids.tolist() == [2, 0, 1]


def test_rows_without_any_forward_are_refused():
    with pytest.raises(RuntimeError, match="without expert ids"):
        StepState(3).rows_batch(torch.zeros(2, 4))


# --- V1 runner adapter (fake runner) ------------------------------------------------------------------

class _FakeRunnerBase:
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        self.seen = kw
        return "out"

    def _dummy_run(self, n):
        return self.model.cm_ctx.step.in_dummy_run

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        return dict(self.model.cm_ctx.step.prompt_logprob_rows)


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


def test_v1_adapter_gives_prompt_logprobs_rows_their_requests_experts():
    """The lm_head learns, from the runner, where each prompt-logprobs request starts in the
    step and its expert; requests not scheduled this step are left out."""
    r = _FakeV1Runner({"a": 1, "b": 0, "c": 2}, ["c", "a", "b"], [2, 1, 3])
    r.num_prompt_logprobs = {"a": 3, "b": 2, "z": 1}
    assert r._get_prompt_logprobs_dict(torch.zeros(6, 4), {"a": 1, "b": 3}) == {2: 1, 3: 0}
    assert r.model.cm_ctx.step.in_prompt_logprobs is False


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
