"""Merge config validation: every error names the file, the field and the allowed values."""

from __future__ import annotations

import pytest

from merge_tool.config import ConfigError, MergeConfig, load_config, parse_config, parse_size


def _cfg(**kw):
    d = {"base_model": "base", "experts": [{"name": "math", "model": "m"}, {"name": "code", "model": "c"}],
         "num_groups": 2}
    d.update(kw)
    return d


def test_defaults_and_derived():
    c = parse_config(_cfg())
    assert c.similarity == "cosine" and c.method == "average" and c.fold_norms is True
    assert c.expert_names == ["math", "code"]
    assert c.parameters.scale == 1.0 and c.parameters.density == 0.5
    assert c.shard_bytes == 5 * 10**9


def test_lambda_alias_and_params():
    c = parse_config(_cfg(method="ties", parameters={"lambda": 0.5, "density": 0.2, "seed": 3}))
    assert c.parameters.scale == 0.5 and c.parameters.density == 0.2 and c.parameters.seed == 3


@pytest.mark.parametrize("field,value,needle", [
    ("method", "slerp", "method: got 'slerp'; allowed values: average, task_arithmetic, ties, dare"),
    ("similarity", "dot", "similarity: got 'dot'; allowed values: cosine, euclidean"),
    ("dtype", "int8", "dtype: got 'int8'; allowed values: auto, float32, bfloat16, float16"),
    ("num_groups", 0, "num_groups is 0; it must be between 1 and the number of experts (2)"),
    ("num_groups", 3, "num_groups is 3; it must be between 1 and the number of experts (2)"),
    ("num_groups_overrides", {"*.lm_head": 5}, "num_groups_overrides['*.lm_head'] is 5"),
    ("parameters", {"density": 0.0}, "parameters.density: density must be in (0, 1]"),
    ("parameters", {"alpha": 1}, "parameters.alpha: unknown field; allowed fields: scale, density, seed, normalize"),
    ("max_shard_size", "lots", "max_shard_size: 'lots' is not a size"),
    ("bogus", 1, "bogus: unknown field; allowed fields: base_model, experts"),
])
def test_bad_fields(field, value, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(**{field: value}), "merge.yaml")
    assert needle in str(ei.value)
    assert str(ei.value).startswith("merge.yaml: ")


@pytest.mark.parametrize("experts,needle", [
    ([{"name": "math", "model": "a"}, {"name": "math", "model": "b"}], "duplicate expert name 'math'"),
    ([{"name": "../etc", "model": "a"}], "experts.0.name: invalid expert name '../etc'"),
    ([{"name": "has space", "model": "a"}], "invalid expert name 'has space'"),
    ([{"name": "auto", "model": "a"}], "reserved"),
    ([], "at least one expert"),
    ([{"name": "x"}], "experts.0.model: required field is missing"),
])
def test_bad_expert_names(experts, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(experts=experts, num_groups=1), "m.yaml")
    assert needle in str(ei.value)


def test_missing_required():
    with pytest.raises(ConfigError, match="base_model: required field is missing"):
        parse_config({"experts": [{"name": "a", "model": "a"}], "num_groups": 1})


def test_groups_for_tensor_overrides_and_exclude():
    c = parse_config(_cfg(num_groups_overrides={"lm_head": 1, "model.layers.1.*": 1},
                          exclude=["*.embed_tokens.weight"]))
    assert c.groups_for_tensor("model.layers.0.self_attn.q_proj.weight") == 2
    assert c.groups_for_tensor("model.layers.1.self_attn.q_proj.weight") == 1
    assert c.groups_for_tensor("lm_head.weight") == 1  # module-name match
    assert c.groups_for_tensor("model.embed_tokens.weight") == 1
    assert not c.is_selected("model.embed_tokens.weight")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size(1234) == 1234
    for bad in ("", "GB", "-1", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("experts: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    p.write_text("base_model: b\nexperts: [{name: e, model: sub/e}]\nnum_groups: 1\nmethod: nope\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: method: got 'nope'; allowed values"):
        load_config(p)


def test_load_config_resolves_relative_paths(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base_model: b\nexperts: [{name: e, model: sub/e}]\nnum_groups: 1\n")
    c = load_config(p)
    assert c.base_model == str(tmp_path / "b")
    assert c.experts[0].model == str(tmp_path / "sub" / "e")
    assert isinstance(c, MergeConfig)


def test_top_level_method_params_like_mergekit():
    c = parse_config(_cfg(method="ties", density=0.3, **{"lambda": 0.8}))
    assert c.parameters.density == 0.3 and c.parameters.scale == 0.8
    with pytest.raises(ConfigError, match="both at the top level and under 'parameters'"):
        parse_config(_cfg(density=0.3, parameters={"density": 0.4}))
    with pytest.raises(ConfigError, match="parameters.density: density must be in"):
        parse_config(_cfg(density=2.0))
