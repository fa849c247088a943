"""The quality benchmark's client and resume bookkeeping (benchmarks/quality)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.quality import compare, evaluate


def test_openai_generator_waits_for_slow_batches_and_never_retries() -> None:
    # 64 rank-128 LoRA requests on 2 cores outlasted the client's default 600 s, and its default
    # retries would have resent requests the server was still working on.
    g = evaluate.OpenAIGenerator("http://127.0.0.1:9/v1", "arith")
    assert g.client.max_retries == 0
    assert g.client.timeout == evaluate.REQUEST_TIMEOUT_S
    assert evaluate.REQUEST_TIMEOUT_S >= 3600


def test_quality_servers_allow_long_engine_steps() -> None:
    # vLLM's default (300 s) killed the engine during a rank-128 LoRA prefill of 64 requests.
    assert int(compare.SERVER_ENV["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"]) >= 3600


def test_partial_scores_resume_only_for_the_same_configuration(tmp_path: Path) -> None:
    path = tmp_path / "partial" / "lora_r128.test.json"
    fp = {"system": "lora_r128", "split": "test", "concurrency": 64, "model_dir": "/m", "params_ratio": 0.6,
          "lora": {"arith": {"adapter_params": 1}}}
    compare._save_partial(path, {"fingerprint": fp, "started": "2026-12-07T12:00:00+00:00",
                                 "accuracy": {"arith": 0.83}, "eval_seconds": {"arith": 1.0}, "samples": {}})
    assert compare._load_partial(path, fp)["accuracy"] == {"arith": 0.83}
    assert compare._load_partial(path, {**fp, "concurrency": 16}) == {}
    assert compare._load_partial(path, {**fp, "lora": {"arith": {"adapter_params": 2}}}) == {}
    assert compare._load_partial(tmp_path / "missing.json", fp) == {}
    assert not list(path.parent.glob("*.tmp"))


class _NoServer:
    start_seconds = 0.0
    started = 0

    def __init__(self, *args: object) -> None:
        _NoServer.started += 1

    def __enter__(self) -> "_NoServer":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _fake_measure(monkeypatch, tmp_path: Path) -> list[str]:
    """compare.measure with no server (starts counted in _NoServer.started): each task scores 1.0; returns the tasks it scored."""
    scored: list[str] = []
    _NoServer.started = 0

    def fake_evaluate(gen, tasks, split, limit, verbose=False):
        scored.extend(tasks)
        return {"accuracy": {t: 1.0 for t in tasks}, "seconds": {t: 0.1 for t in tasks},
                "samples": {t: [] for t in tasks}}

    monkeypatch.setattr(compare, "WORK", tmp_path)
    monkeypatch.setattr(compare, "Server", _NoServer)
    monkeypatch.setattr(compare, "server_cmd", lambda *a: [])
    monkeypatch.setattr(compare, "params_ratio", lambda *a: 0.25)
    monkeypatch.setattr(compare, "OpenAIGenerator", lambda *a, **k: None)
    monkeypatch.setattr(compare, "evaluate", fake_evaluate)
    return scored


def test_measure_resumes_saved_tasks_and_a_smoke_run_keeps_them(monkeypatch, tmp_path: Path) -> None:
    scored = _fake_measure(monkeypatch, tmp_path)
    first, rest = compare.TASKS[0], list(compare.TASKS[1:])
    entry = compare.measure("base", 64, None, only=[first])
    assert entry["pending"] == rest and scored == [first]
    partial = tmp_path / "partial" / "base.test.json"
    assert partial.exists()
    compare.measure("base", 64, 5)  # a smoke run neither reads nor removes the saved scores
    assert partial.exists()
    scored.clear()
    entry = compare.measure("base", 64, None)
    assert scored == rest and entry["resumed"]["tasks"] == [first] and "pending" not in entry
    assert not partial.exists()


def test_measure_starts_no_server_when_nothing_is_left_to_score(monkeypatch, tmp_path: Path) -> None:
    scored = _fake_measure(monkeypatch, tmp_path)
    first = compare.TASKS[0]
    entry = compare.measure("expert_" + first, 64, None, only=[compare.TASKS[1]])  # not this expert's task
    assert _NoServer.started == 0 and scored == [] and entry["pending"] == [first]
    compare.measure("base", 64, None, only=[first])
    assert _NoServer.started == 1
    # every task saved but the results not yet written (a run cut off after its last task): no server
    partial = tmp_path / "partial" / "base.test.json"
    saved = json.loads(partial.read_text())
    saved["accuracy"] = {t: 1.0 for t in compare.TASKS}
    partial.write_text(json.dumps(saved))
    entry = compare.measure("base", 64, None)
    assert _NoServer.started == 1 and entry["average"] == 1.0 and "pending" not in entry
