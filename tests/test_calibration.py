"""The data-aware budget criteria (`activation*`): calibration texts, the activations recorded
from the base model, the output error they measure, and merges that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_tool import budget, calibration as calib
from merge_tool import merge as mergemod
from merge_tool.config import ConfigError, parse_config
from merge_tool.merge import run_merge
from merge_tool.plan import build_plan
from vllm_channelmerge import format as fmt

TEXTS = ["the cat sat on the mat one two three", "def add return sum value",
         "hello world model expert merge channel", "red blue green big small fast slow"]


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    p = tmp_path / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return p


# -- texts -------------------------------------------------------------------------------------


def test_texts_from_json_lines_or_plain_lines(tmp_path, calib_file):
    assert calib.load_texts(calib_file) == TEXTS
    txt = tmp_path / "c.txt"
    txt.write_text("first text\n\n  second text\n")
    assert calib.load_texts(txt) == ["first text", "  second text"]


@pytest.mark.parametrize("name,content,needle", [
    ("c.jsonl", '{"text": "a"}\n{"text": 5}\n', 'c.jsonl:2: each line must be an object with a non-empty "text"'),
    ("c.jsonl", '{"text": "a"}\nnot json\n', "c.jsonl:2: not valid JSON"),
    ("c.txt", "\n\n", "c.txt: no calibration texts"),
    ("c.txt", None, "c.txt: calibration file not found"),
])
def test_bad_texts_name_the_file_and_line(tmp_path, name, content, needle):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(calib.CalibrationError) as e:
        calib.load_texts(p)
    assert needle in str(e.value)


# -- the measure --------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [5, 40])  # fewer rows than columns (X kept) and more (Gram root)
def test_inputs_factor_keeps_the_gram_matrix(tokens):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 12, generator=g)
    acc = calib._Inputs()
    for part in x.split(3):
        acc.add(part)
    f = acc.factor()
    assert f.shape[0] == min(tokens, 12)
    torch.testing.assert_close(f.double().T @ f.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def test_output_error_is_the_layer_output_error_summed_over_experts_and_tokens():
    g = torch.Generator().manual_seed(1)
    r, x, counts = torch.randn(6, 3, 5, generator=g), torch.randn(7, 5, generator=g), torch.rand(6, generator=g)
    want = torch.tensor([sum(float((x @ r[c, n]).square().sum()) + float(counts[c]) * float(r[c, n].square().sum())
                             for n in range(3)) for c in range(6)], dtype=torch.float64)
    torch.testing.assert_close(calib.output_error(r, x, counts), want)
    torch.testing.assert_close(calib.output_error(r, None, None), torch.zeros(6, dtype=torch.float64))


# -- what the base model's run records ----------------------------------------------------------


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(model_dir)),
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval())


def test_collect_records_each_layers_inputs(llama_family):
    """q/k/v share the input layernorm's output (one copy), down_proj reads the MLP's hidden
    activations, the embedding counts its tokens; compared with a run of the model's modules."""
    wanted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"}
    cal = calib.collect(llama_family.base, TEXTS, 10**6, wanted, torch.device("cpu"))
    assert set(cal.tensors) == wanted and cal.texts == len(TEXTS)
    tok, model = _hf(llama_family.base)
    xs, downs, ids_all = [], [], []
    with torch.no_grad():
        for t in TEXTS:
            ids = tok(t, return_tensors="pt")["input_ids"]
            ids_all.append(ids.flatten())
            h = model(input_ids=ids, output_hidden_states=True).hidden_states
            layer0, layer1 = model.model.layers[0], model.model.layers[1]
            xs.append(layer0.input_layernorm(h[0])[0])
            mid = layer1.post_attention_layernorm(h[1] + layer1.self_attn(
                layer1.input_layernorm(h[1]), position_embeddings=model.model.rotary_emb(h[1], torch.arange(
                    ids.shape[1]).unsqueeze(0)), attention_mask=None)[0])[0]
            downs.append(layer1.mlp.act_fn(layer1.mlp.gate_proj(mid)) * layer1.mlp.up_proj(mid))
    x, down = torch.cat(xs), torch.cat(downs)
    assert cal.tokens == x.shape[0]

    def gram(f: torch.Tensor) -> torch.Tensor:
        return f.double().T @ f.double()

    q = cal.tensors["model.layers.0.self_attn.q_proj.weight"].inputs
    torch.testing.assert_close(gram(q), gram(x), rtol=1e-4, atol=1e-3)
    assert cal.tensors["model.layers.0.self_attn.k_proj.weight"].inputs is q  # one copy, shared
    torch.testing.assert_close(gram(cal.tensors["model.layers.1.mlp.down_proj.weight"].inputs), gram(down),
                               rtol=1e-4, atol=1e-3)
    emb = cal.tensors["model.embed_tokens.weight"]
    assert emb.inputs is None  # untied: the lm_head is its own tensor
    assert torch.equal(emb.counts, torch.bincount(torch.cat(ids_all), minlength=emb.counts.numel()).float())
    assert cal.tensors["lm_head.weight"].inputs is not None and cal.tensors["lm_head.weight"].counts is None


def test_collect_tied_embedding_and_biases(qwen2_tied_family):
    """A tied embedding is measured as a lookup and as the lm_head; a layer with a bias gets a
    column of ones (its bias element is part of the channel)."""
    wanted = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    cal = calib.collect(qwen2_tied_family.base, TEXTS[:2], 10**6, wanted, torch.device("cpu"))
    emb = cal.tensors["model.embed_tokens.weight"]
    assert emb.counts is not None and emb.inputs is not None and float(emb.counts.sum()) == cal.tokens
    q = cal.tensors["model.layers.0.self_attn.q_proj.weight"].inputs
    hidden = emb.inputs.shape[1]
    assert q.shape[1] == hidden + 1
    gq = q.double().T @ q.double()
    assert float(gq[hidden, hidden]) == pytest.approx(cal.tokens)  # the ones column: one per token


def test_collect_stops_at_max_tokens(llama_family):
    cal = calib.collect(llama_family.base, TEXTS, 9, {"model.layers.0.self_attn.q_proj.weight"},
                        torch.device("cpu"))
    assert cal.tokens == 9 and cal.tensors["model.layers.0.self_attn.q_proj.weight"].inputs.shape[0] == 9


def test_collect_refuses_tensors_the_model_never_uses(llama_family):
    with pytest.raises(calib.CalibrationError, match="never used model.layers.99.mlp.up_proj.weight"):
        calib.collect(llama_family.base, TEXTS, 100, {"model.layers.99.mlp.up_proj.weight"}, torch.device("cpu"))


# -- the criterion in a merge ------------------------------------------------------------------


def _curves(cfg) -> dict[str, budget.Curve]:
    base, experts = mergemod._open_inputs(cfg)
    try:
        plan = build_plan(cfg, base, experts, Path("unused"))
        m = mergemod._Merger(plan, base, experts, torch.device("cpu"))
        if cfg.calibration is not None:  # identity inputs: the output error is the weight error
            m.activations = calib.Calibration({j.source: calib.Activations(
                torch.eye(j.shape[1] + (1 if j.bias else 0))) for j in plan.jobs if j.splittable})
        return {c.name: c for c in m.measure(False, False)}
    finally:
        mergemod._close(base, experts)


def test_activation_with_identity_inputs_is_the_method_criterion(qwen2_tied_family, calib_file):
    """The measure is the method's rows' error in the inputs' metric: with X = I it is exactly
    the `method` criterion's squared weight error (biases included)."""
    common = dict(num_groups=3, method="ties", budget=0.5, fold_norms=False)
    meth = _curves(qwen2_tied_family.merge_config(budget_criterion="method", **common))
    act = _curves(qwen2_tied_family.merge_config(budget_criterion="activation", calibration={"file": str(calib_file)},
                                                 **common))
    assert set(meth) == set(act) and len(meth) > 5
    for name in meth:
        torch.testing.assert_close(act[name].error, meth[name].error, rtol=1e-5, atol=1e-6)
        assert torch.equal(act[name].groups, meth[name].groups)


@pytest.mark.parametrize("fam", ["llama_family", "qwen2_tied_family"])
def test_activation_budget_merge(fam, calib_file, tmp_path, request):
    """An activation budget merge meets the budget, puts rows where the output error is, and
    records its calibration; the extracted experts are the lookup of what it wrote."""
    family = request.getfixturevalue(fam)
    cfg = family.merge_config(num_groups=2, method="ties", budget=0.35, budget_criterion="activation_per_tensor",
                              calibration={"file": str(calib_file), "max_tokens": 64})
    out = run_merge(cfg, tmp_path / "m", progress=False)
    rep = json.loads((out / fmt.REPORT_FILE).read_text())
    assert rep["params"]["stored"] <= 0.35 * rep["params"]["ensemble"]
    assert rep["budget"]["criterion"] == "activation_per_tensor"
    cal = rep["budget"]["calibration"]
    assert cal["file"] == str(calib_file) and cal["texts"] == len(TEXTS) and 0 < cal["tokens"] <= 64
    assert 0 < rep["budget"]["error_removed"] < 1
    assert fmt.read_checkpoint_config(out).budget["criterion"] == "activation_per_tensor"
    assert "calibration:" in (out / "README.md").read_text()


@pytest.mark.parametrize("fields,needle", [
    ({"budget": 0.3, "budget_criterion": "activation"},
     "budget_criterion 'activation' measures the error on calibration inputs: give `calibration: {file: TEXTS}`"),
    ({"budget": 0.3, "calibration": {"file": "c.txt"}},
     "calibration is given but the budget criterion is 'weight_per_tensor'"),
    ({"calibration": {"file": "c.txt"}}, "and there is no budget"),
    ({"budget": 0.3, "budget_criterion": "activation", "calibration": {"file": "c.txt", "tokens": 5}},
     "calibration.tokens: unknown field; allowed fields: file, max_tokens"),
    ({"budget": 0.3, "budget_criterion": "activation", "calibration": {"file": "c.txt", "max_tokens": 0}},
     "calibration.max_tokens: is 0; it must be between 1 and 10000000"),
])
def test_bad_calibration_fields(llama_family, fields, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(llama_family.config(num_groups=2, **fields), "merge.yaml")
    assert needle in str(e.value)


def test_a_bad_calibration_file_is_refused_before_anything_is_written(llama_family, tmp_path, leftovers):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"txt": "a"}\n')
    cfg = llama_family.merge_config(num_groups=2, budget=0.35, budget_criterion="activation_per_tensor",
                                    calibration={"file": str(bad)})
    with pytest.raises(ConfigError, match=r'calibration: .*c.jsonl:1: each line must be an object with a non-empty "text"'):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_activation_error_of_a_folded_layer_is_its_output_error(llama_family, calib_file):
    """q_proj after the folded input layernorm: the measured error with one row per channel is
    Σ over experts and tokens of ((average row − expert's row) · x)², computed here from the
    experts' own files and norms, on the normalized inputs x the transformers model computes."""
    from safetensors.torch import load_file

    cfg = llama_family.merge_config(num_groups=2, method="average", budget=0.35, budget_criterion="activation",
                                    calibration={"file": str(calib_file)})
    base, experts = mergemod._open_inputs(cfg)
    try:
        plan = build_plan(cfg, base, experts, Path("unused"))
        m = mergemod._Merger(plan, base, experts, torch.device("cpu"))
        name = "model.layers.0.self_attn.q_proj.weight"
        m.activations = calib.collect(cfg.base_model, TEXTS, 10**6, {name}, torch.device("cpu"))
        job = next(j for j in plan.jobs if j.source == name)
        assert job.norm == "model.layers.0.input_layernorm.weight"
        got = m._curve(job, False).error[:, 0]
    finally:
        mergemod._close(base, experts)
    tok, model = _hf(llama_family.base)
    layer = model.model.layers[0].input_layernorm
    with torch.no_grad():
        xs = [layer(model.model.embed_tokens(tok(t, return_tensors="pt")["input_ids"]))[0] / layer.weight
              for t in TEXTS]
    x = torch.cat(xs).double()
    rows = []
    for d in experts_dirs(llama_family):
        sd = load_file(str(next(Path(d).glob("*.safetensors"))))
        rows.append(sd[name].double() * sd[job.norm].double())  # the expert's folded rows
    w = torch.stack(rows)  # [N, out, in]
    r = w.mean(0, keepdim=True) - w
    want = (r @ x.T).square().sum((0, 2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def experts_dirs(family) -> list[Path]:
    return [Path(p) for p in family.experts.values()]
