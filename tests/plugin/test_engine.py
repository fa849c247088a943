"""The plugin in a real vLLM engine (CPU) against stock vLLM serving the extracted experts."""

from __future__ import annotations

import pytest

from .conftest import EXPERTS, needs_vllm

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]

LOGPROB_TOL = 1e-3


def _same_logprobs(got: list[dict], want: list[dict], where: str) -> None:
    assert len(got) == len(want) > 0, where  # zip() passes on empty
    for i, (g, w) in enumerate(zip(got, want)):
        common = set(g) & set(w)
        # The sampled token and the top tokens agree (a near-tie at the k-th rank may swap).
        assert len(common) >= min(len(g), len(w)) - 1, f"{where} step {i}: {g} vs {w}"
        for t in common:
            assert abs(g[t] - w[t]) <= LOGPROB_TOL, f"{where} step {i} token {t}: {g[t]} vs {w[t]}"


@pytest.mark.parametrize("expert", EXPERTS)
def test_expert_matches_extracted_checkpoint(plugin_run, reference_run, expert):
    """Greedy tokens (32) and top-5 logprobs equal stock vLLM on `extract_expert` output."""
    got = plugin_run["single"][expert]
    want = reference_run[expert]["prompts"]
    assert len(got) == len(want) > 0, expert  # zip() passes on empty
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g["tokens"]) >= 32
        assert g["tokens"] == w["tokens"], f"{expert} prompt {i}"
        _same_logprobs(g["logprobs"], w["logprobs"], f"{expert} prompt {i}")


def test_experts_differ(plugin_run):
    """Sanity: the experts really are different models (else the tests above prove little)."""
    firsts = {e: tuple(plugin_run["single"][e][0]["tokens"]) for e in EXPERTS}
    assert len(set(firsts.values())) == len(EXPERTS)


def test_mixed_batch_equals_single_expert_runs(plugin_run):
    assert len(plugin_run["mixed"]) == len(EXPERTS) * 4
    for r in plugin_run["mixed"]:
        single = plugin_run["single"][r["expert"]][r["prompt"]]
        assert r["tokens"] == single["tokens"], r["expert"]
        _same_logprobs(r["logprobs"], single["logprobs"], f"mixed {r['expert']}")


def test_prefix_caching_keeps_experts_apart(plugin_run, reference_run):
    """Same long prompt to two experts in turn: each gets its own answer; the cache is still
    used within an expert (the third request, expert a again, hits it)."""
    a, b = EXPERTS[0], EXPERTS[1]
    runs = plugin_run["long"]
    assert runs[a][0]["tokens"] == reference_run[a]["long"]["tokens"]
    assert runs[b][0]["tokens"] == reference_run[b]["long"]["tokens"]
    assert runs[b][0]["cached"] == 0, "expert b reused expert a's KV blocks"
    assert runs[a][1]["tokens"] == reference_run[a]["long"]["tokens"]
    assert runs[a][1]["cached"] > 0, "prefix caching within one expert should still hit"


def test_prompt_logprobs_per_expert(plugin_run, reference_run):
    """Prompt logprobs compute logits for a slice of the tokens: each row uses its token's expert."""
    for e, got in plugin_run["prompt_logprobs"].items():
        want = reference_run[e]["prompt_logprobs"]
        assert got[0] is None and len(got) == len(want) > 2
        _same_logprobs(got[1:], want[1:], f"prompt logprobs {e}")


def test_unknown_expert_is_refused_offline(plugin_run):
    err = plugin_run["unknown_error"]
    assert err is not None and "no-such-expert" in err and "math" in err


def test_no_expert_is_refused_offline(plugin_run):
    """Without a default_expert in the checkpoint, a request naming no expert is refused (it
    used to be answered silently by the first expert)."""
    err = plugin_run["no_expert_error"]
    assert err is not None and "names no expert" in err
    assert all(e in err for e in EXPERTS)
