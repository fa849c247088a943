"""Faults a merge must survive without harming anything: overlapping paths, races, signals,
bad numbers, I/O errors. Each test failed before its fix."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_tool import io as mio
from merge_tool.cli import main
from merge_tool.config import ConfigError, load_config, parse_config
from merge_tool.extract import extract_expert
from merge_tool.merge import run_merge
from vllm_channelmerge import format as fmt

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny base and three experts, shared read-only by the tests of this file."""
    from merge_tool.synthetic import make_family

    root = tmp_path_factory.mktemp("fault_family")
    make_family(root, NAMES, num_layers=1)
    return root


@pytest.fixture
def own_fam(fam, tmp_path):
    """A private copy of the family, for tests that would destroy inputs if the fix regressed."""
    root = tmp_path / "fam"
    shutil.copytree(fam, root)
    return root


def cfg_dict(root: Path, **kw):
    d = {"base_model": str(root / "base"), "experts": [{"name": n, "model": str(root / n)} for n in NAMES],
         "num_groups": 2}
    d.update(kw)
    return d


def cfg(root: Path, **kw):
    return parse_config(cfg_dict(root, **kw))


def write_yaml(path: Path, d) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("channelmerge: error: "), err
    return lines[-1]


# -- 1. the output may never be an input, hold one, or sit inside one ----------------------------

def test_dotdot_output_is_the_base_and_is_refused(own_fam, capsys):
    before = snapshot(own_fam / "base")
    y = write_yaml(own_fam / "merge.yaml", cfg_dict(own_fam))
    out = f"{own_fam}/a/../base"
    assert main(["merge", str(y), out, "--force", "-q"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "would overwrite the input model" in line and out in line and str(own_fam / "base") in line
    assert snapshot(own_fam / "base") == before


def test_symlinked_expert_and_real_output_is_refused(own_fam, tmp_path):
    link = tmp_path / "link_b"
    link.symlink_to(own_fam / "b")
    d = cfg_dict(own_fam)
    d["experts"][1]["model"] = str(link)
    before = snapshot(own_fam / "b")
    with pytest.raises(ConfigError, match=rf"output folder {own_fam / 'b'} would overwrite the input model {link}"):
        run_merge(parse_config(d), own_fam / "b", force=True, progress=False)
    # an output that is a symlink to a folder holding the inputs
    up = tmp_path / "up"
    up.symlink_to(own_fam)
    with pytest.raises(ConfigError, match="would overwrite the input model"):
        run_merge(parse_config(d), up, force=True, progress=False)
    assert snapshot(own_fam / "b") == before


def test_output_inside_an_input_is_refused(own_fam):
    with pytest.raises(ConfigError, match=r"would be written inside the input model .*/base"):
        run_merge(cfg(own_fam), own_fam / "base" / "merged", progress=False)
    assert sorted(p.name for p in (own_fam / "base").iterdir() if "merged" in p.name) == []


def test_same_inode_is_refused_even_when_paths_differ(own_fam, tmp_path, monkeypatch):
    """A bind mount shows one folder under two real paths: compare device and inode too
    (simulated here: realpath that does not see through the symlink)."""
    link = tmp_path / "link_b"
    link.symlink_to(own_fam / "b")
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    with pytest.raises(ConfigError, match="would overwrite the input model"):
        run_merge(cfg(own_fam), link, force=True, progress=False)
    assert (own_fam / "b" / "model.safetensors").exists()


def _can_bind_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount --bind /tmp /tmp"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_bind_mount(), reason="needs root and mount namespaces")
def test_bind_mounted_expert_is_refused(own_fam, tmp_path):
    (tmp_path / "mnt").mkdir()
    y = write_yaml(tmp_path / "merge.yaml", cfg_dict(own_fam))
    before = snapshot(own_fam / "b")
    script = (f"mount --bind {own_fam / 'b'} {tmp_path / 'mnt'} && exec {sys.executable} -m merge_tool.cli "
              f"merge {y} {tmp_path / 'mnt'} --force -q")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "would overwrite the input model" in one_error_line(r.stderr)
    assert snapshot(own_fam / "b") == before


def test_extract_into_its_source_through_dotdot_is_refused(fam, tmp_path):
    merged = run_merge(cfg(fam), tmp_path / "m", progress=False)
    before = snapshot(merged)
    with pytest.raises(FileExistsError, match="would overwrite the merged checkpoint"):
        extract_expert(merged, "a", f"{merged}/../m", force=True)
    with pytest.raises(FileExistsError, match="would overwrite the merged checkpoint"):
        extract_expert(merged, "a", tmp_path, force=True)
    with pytest.raises(FileExistsError, match="would be written inside the merged checkpoint"):
        extract_expert(merged, "a", merged / "a")
    assert snapshot(merged) == before


def _router_rows():
    words = {"a": "add plus sum", "b": "python def loop", "c": "hello friend weather"}
    return [{"expert": e, "prompt": f"{w} {i}"} for e, w in words.items() for i in range(6)]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_router_train_force_keeps_foreign_folders(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    qc = fmt.ChannelMergedConfig(experts=NAMES, num_groups=2).to_dict()
    (d / fmt.CONFIG_FILE).write_text(json.dumps({"architectures": ["ChannelMergedLlamaForCausalLM"],
                                                 "quantization_config": qc}))
    (d / "router").mkdir()
    (d / "router" / "notes.txt").write_text("mine")
    ex = _jsonl(tmp_path / "ex.jsonl", _router_rows())
    assert main(["router", "train", str(d), ex, "--force"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is not a channelmerge router" in line and "--force only replaces channelmerge's own output" in line
    assert (d / "router" / "notes.txt").read_text() == "mine"
    # the examples file inside router/ is an input: never replaced
    shutil.rmtree(d / "router")
    assert main(["router", "train", str(d), ex]) == 0
    inside = _jsonl(d / "router" / "ex.jsonl", _router_rows())
    assert main(["router", "train", str(d), inside, "--force"]) == 2
    assert "the examples file" in one_error_line(capsys.readouterr().err)
    assert Path(inside).exists()
    os.unlink(inside)
    assert main(["router", "train", str(d), ex, "--force"]) == 0  # a previous router is replaced
    assert leftovers(d, "router") == ["router"]


# -- 2. publishing: no-replace rename, --force only on own output, the lock ---------------------

def _during_merge(monkeypatch, action, at: int = 2):
    from merge_tool import merge as mm

    real = mm._Merger.channel
    calls = {"n": 0}

    def hooked(self, job, writer, stats):
        calls["n"] += 1
        if calls["n"] == at:
            action()
        return real(self, job, writer, stats)

    monkeypatch.setattr(mm._Merger, "channel", hooked)


def test_folder_appearing_during_merge_is_kept(fam, tmp_path, monkeypatch):
    out = tmp_path / "m"

    def appear():
        out.mkdir()
        (out / "user.txt").write_text("mine")

    _during_merge(monkeypatch, appear)
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        run_merge(cfg(fam), out, progress=False)
    assert (out / "user.txt").read_text() == "mine"
    assert leftovers(tmp_path, "m") == ["m"]
    # with --force too: a folder that is not channelmerge's output is never replaced
    with pytest.raises(FileExistsError, match="--force only replaces channelmerge's own output"):
        run_merge(cfg(fam), out, force=True, progress=False)
    shutil.rmtree(out)
    monkeypatch.undo()
    _during_merge(monkeypatch, appear)
    with pytest.raises(FileExistsError, match="is not a channelmerge merged checkpoint"):
        run_merge(cfg(fam), out, force=True, progress=False)
    assert (out / "user.txt").read_text() == "mine"
    assert leftovers(tmp_path, "m") == ["m"]


def test_empty_folder_appearing_without_force_is_an_error(fam, tmp_path, monkeypatch):
    out = tmp_path / "m"
    _during_merge(monkeypatch, out.mkdir)
    with pytest.raises(FileExistsError, match="appeared"):
        run_merge(cfg(fam), out, progress=False)
    assert leftovers(tmp_path, "m") == ["m"] and list(out.iterdir()) == []


def test_second_merge_to_the_same_output_is_locked_out(fam, tmp_path, monkeypatch):
    out = tmp_path / "m"
    seen = {}

    def second():
        with pytest.raises(mio.OutputBusyError) as ei:
            run_merge(cfg(fam), out, force=True, progress=False)
        seen["msg"] = str(ei.value)

    _during_merge(monkeypatch, second)
    run_merge(cfg(fam), out, progress=False)
    assert str(out) in seen["msg"] and f"pid {os.getpid()}" in seen["msg"]
    assert leftovers(tmp_path, "m") == ["m"]  # lock file removed


def test_force_replaces_only_channelmerge_output(fam, tmp_path, monkeypatch):
    out = tmp_path / "m"
    run_merge(cfg(fam, num_groups=1), out, progress=False)
    # the old output stays in place until the new one is ready
    _during_merge(monkeypatch, lambda: json.loads((out / fmt.CONFIG_FILE).read_text()))
    run_merge(cfg(fam, num_groups=3), out, force=True, progress=False)
    assert json.loads((out / fmt.CONFIG_FILE).read_text())["quantization_config"]["num_groups"] == 3
    assert leftovers(tmp_path, "m") == ["m"]
    monkeypatch.undo()
    # a merged checkpoint holding a file channelmerge did not write
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="also holds 'notes.txt'"):
        run_merge(cfg(fam), out, force=True, progress=False)
    (out / "notes.txt").unlink()
    # a model folder that is not an input
    other = tmp_path / "other"
    shutil.copytree(fam / "a", other)
    with pytest.raises(FileExistsError, match="is not a channelmerge merged checkpoint.*--force only replaces"):
        run_merge(cfg(fam), other, force=True, progress=False)
    with pytest.raises(FileExistsError, match="is not an expert extracted by channelmerge"):
        extract_expert(out, "a", other, force=True)
    assert snapshot(other) == snapshot(fam / "a")
    # extract --force replaces its own previous output, not a merged checkpoint
    x = extract_expert(out, "a", tmp_path / "x")
    assert json.loads((x / fmt.CONFIG_FILE).read_text())[mio.EXTRACT_MARKER]["expert"] == "a"
    extract_expert(out, "b", x, force=True)
    assert json.loads((x / fmt.CONFIG_FILE).read_text())[mio.EXTRACT_MARKER]["expert"] == "b"
    m2 = run_merge(cfg(fam), tmp_path / "m2", progress=False)
    with pytest.raises(FileExistsError, match="is not an expert extracted by channelmerge"):
        extract_expert(out, "a", m2, force=True)
    with pytest.raises(FileExistsError, match="is not a channelmerge merged checkpoint"):
        run_merge(cfg(fam), x, force=True, progress=False)
    assert leftovers(tmp_path, "x") == ["x"]


# -- 3. signals: SIGTERM cleans up, SIGKILL leftovers are swept ----------------------------------

SLOW_CLI = textwrap.dedent("""
    import sys, time
    from merge_tool import merge as m
    real = m._Merger.channel
    def slow(self, *a, **k):
        time.sleep(0.3)
        return real(self, *a, **k)
    m._Merger.channel = slow
    from merge_tool.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_merge(fam: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    y = write_yaml(tmp_path / "merge.yaml", cfg_dict(fam))
    out = tmp_path / "m"
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "merge", str(y), str(out), "-q"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not glob.glob(str(tmp_path / ".m.tmp-*" / "*.safetensors")):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"merge did not start writing: {p.communicate()}")
        time.sleep(0.05)
    return p, out


def test_sigterm_removes_the_temp_folder(fam, tmp_path):
    p, out = _start_slow_merge(fam, tmp_path)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated by SIGTERM" in err
    assert leftovers(tmp_path, "m") == []


def test_sigkill_leftovers_are_swept_by_the_next_merge(fam, tmp_path, caplog):
    p, out = _start_slow_merge(fam, tmp_path)
    p.kill()
    p.wait(timeout=60)
    stale = glob.glob(str(tmp_path / ".m.tmp-*"))
    assert len(stale) == 1 and f".m.tmp-{p.pid}-" in stale[0]
    # a temp folder of a live process is left alone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".other.tmp-{live.pid}-abcd1234"
        busy.mkdir()
        with caplog.at_level("WARNING", logger="merge_tool.io"):
            run_merge(cfg(fam), out, progress=False)
        assert busy.exists()
    finally:
        live.kill()
        live.wait()
    assert leftovers(tmp_path, "m") == ["m"]
    assert stale[0] in caplog.text and f"process {p.pid} that no longer runs" in caplog.text


def test_ctrl_c_is_one_line_and_leaves_nothing(fam, tmp_path, monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    _during_merge(monkeypatch, interrupt)
    y = write_yaml(tmp_path / "merge.yaml", cfg_dict(fam))
    try:
        rc = main(["merge", str(y), str(tmp_path / "m"), "-q"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")
    assert rc == 128 + signal.SIGINT
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path, "m") == []


# -- 4. numbers are strict and finite; the output is checked finite --------------------------------

BAD_YAML = {
    "scale: .nan": "parameters.scale: expected a finite number",
    "scale: .inf": "parameters.scale: expected a finite number",
    "scale: -.inf": "parameters.scale: expected a finite number",
    "scale: 1e39": "parameters.scale: scale is 1e+39; it must be between -1000 and 1000",
    "scale: 2000": "parameters.scale: scale is 2000.0",
    "scale: true": "parameters.scale: expected a number, got True",
    "density: true": "parameters.density: expected a number, got True",
    "density: .nan": "parameters.density: expected a finite number",
    "seed: true": "parameters.seed: expected an integer, got True",
    "seed: 1.5": "parameters.seed: expected an integer, got 1.5",
    "seed: -1": "parameters.seed: seed is -1",
    "normalize: 1": "parameters.normalize: expected true or false, got 1",
    "fold_norms: 'yes'": "fold_norms: expected true or false, got 'yes'",
    "block_rows: true": "block_rows: expected an integer, got True",
    "block_rows: 0": "block_rows: is 0; it must be between 1",
    "kmeans_threshold: 2.5": "kmeans_threshold: expected an integer, got 2.5",
    "max_shard_size: true": "max_shard_size: expected a size",
    "num_groups_overrides: {'*.q_proj': true}": "num_groups_overrides.*.q_proj: expected an integer, got True",
    "default_expert: zz": "default_expert: 'zz' is not one of the experts (a, b, c)",
}


@pytest.mark.parametrize("line", list(BAD_YAML))
def test_bad_numbers_are_refused(tmp_path, line):
    base = "base_model: base\nexperts: [{name: a, model: a}, {name: b, model: b}, {name: c, model: c}]\n"
    p = tmp_path / "merge.yaml"
    p.write_text(base + "num_groups: 2\n" + line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg and BAD_YAML[line] in msg, msg


def test_num_groups_true_is_not_one(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base_model: b\nexperts: [{name: a, model: a}]\nnum_groups: true\n")
    with pytest.raises(ConfigError, match="num_groups: expected an integer, got True"):
        load_config(p)


def test_newline_in_expert_name_is_refused(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text('base_model: b\nexperts: [{name: "a\\n", model: a}]\nnum_groups: 1\n')
    with pytest.raises(ConfigError, match=r"experts.0.name: invalid expert name 'a\\n'"):
        load_config(p)


def test_ints_are_floats_and_yaml_exponents_are_numbers(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base_model: b\nexperts: [{name: a, model: a}]\nnum_groups: 1\nscale: 1\ndensity: 1e-1\n")
    c = load_config(p)
    assert c.parameters.scale == 1.0 and c.parameters.density == pytest.approx(0.1)


def test_nan_scale_through_the_cli_writes_nothing(fam, tmp_path, capsys):
    y = tmp_path / "merge.yaml"
    y.write_text(yaml.safe_dump(cfg_dict(fam, method="task_arithmetic")) + "scale: .nan\n")
    assert main(["merge", str(y), str(tmp_path / "m"), "-q"]) == 2
    assert "parameters.scale" in one_error_line(capsys.readouterr().err)
    assert leftovers(tmp_path, "m") == []


def test_default_expert_is_written_to_the_quantization_config(fam, tmp_path):
    out = run_merge(cfg(fam, default_expert="b"), tmp_path / "m", progress=False)
    qc = json.loads((out / fmt.CONFIG_FILE).read_text())["quantization_config"]
    assert qc["default_expert"] == "b"
    assert yaml.safe_load((out / fmt.MERGE_CONFIG_FILE).read_text())["default_expert"] == "b"
    out = run_merge(cfg(fam), tmp_path / "n", progress=False)
    assert json.loads((out / fmt.CONFIG_FILE).read_text())["quantization_config"].get("default_expert") is None
    assert "default_expert" not in yaml.safe_load((out / fmt.MERGE_CONFIG_FILE).read_text())


def test_overflowing_merge_is_refused_naming_the_tensor(own_fam, tmp_path):
    """Finite float32 inputs whose merge overflows float16: refused, never published."""
    name = "model.layers.0.mlp.down_proj.weight"
    f = own_fam / "b" / "model.safetensors"
    sd = load_file(str(f))
    sd[name] = torch.full_like(sd[name], 60000.0)
    save_file(sd, str(f), metadata={"format": "pt"})
    c = cfg(own_fam, method="task_arithmetic", scale=2.0, dtype="float16", fold_norms=False)
    with pytest.raises(mio.OutputError, match=rf"tensor '{name}': the computed values contain \d+ NaN/Inf"):
        run_merge(c, tmp_path / "m", progress=False)
    assert leftovers(tmp_path, "m") == []


def test_writer_refuses_non_finite_blocks(tmp_path):
    plan = [mio.PlannedTensor("x.weight", torch.float32, (2, 2))]
    w = mio.StreamingShardWriter(tmp_path, plan, 10**6)
    with pytest.raises(mio.OutputError, match="'x.weight'.*1 NaN/Inf"):
        w.write("x.weight", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    w.abort()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_accepts_large_finite_blocks_whose_sum_overflows(tmp_path, dtype):
    plan = [mio.PlannedTensor("x.weight", dtype, (2, 2))]
    w = mio.StreamingShardWriter(tmp_path, plan, 10**6)
    big = torch.full((2, 2), 3.0e38, dtype=dtype)
    w.write("x.weight", big)
    w.close()
    assert torch.equal(load_file(str(next(tmp_path.glob("*.safetensors"))))["x.weight"], big)


# -- 5. I/O errors: one line naming the path, nothing left; published folders follow the umask ----

def test_non_utf8_yaml_is_one_line(tmp_path, capsys):
    y = tmp_path / "merge.yaml"
    y.write_bytes(b"base_model: \xff\xfe\nnum_groups: 1\n")
    assert main(["merge", str(y), str(tmp_path / "m")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(y) in line and "not UTF-8" in line


def _make_read_only(d: Path) -> bool:
    if os.geteuid() != 0:
        d.chmod(0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(d)]).returncode == 0


def _make_writable(d: Path) -> None:
    if os.geteuid() != 0:
        d.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(d)])


def test_read_only_output_parent_is_one_line(fam, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _make_read_only(ro):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        y = write_yaml(tmp_path / "merge.yaml", cfg_dict(fam))
        assert main(["merge", str(y), str(ro / "m"), "-q"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"channelmerge: error: {ro}: ")
        assert list(ro.iterdir()) == []
    finally:
        _make_writable(ro)


def test_full_disk_is_one_line_and_leaves_nothing(fam, tmp_path):
    """RLIMIT_FSIZE makes the shard write fail with EFBIG, as a full disk fails with ENOSPC."""
    y = write_yaml(tmp_path / "merge.yaml", cfg_dict(fam))
    limited = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        from merge_tool.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    r = subprocess.run([sys.executable, "-c", limited, "merge", str(y), str(tmp_path / "m"), "-q"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith(f"channelmerge: error: {tmp_path / 'm'}/model-") and "File too large" in line
    assert leftovers(tmp_path, "m") == []


def test_enospc_mid_write_names_the_output(fam, tmp_path, monkeypatch, capsys):
    real = mio.StreamingShardWriter.write_at
    calls = {"n": 0}

    def full(self, offset, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, offset, tensor)

    monkeypatch.setattr(mio.StreamingShardWriter, "write_at", full)
    y = write_yaml(tmp_path / "merge.yaml", cfg_dict(fam))
    assert main(["merge", str(y), str(tmp_path / "m"), "-q"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"channelmerge: error: {tmp_path / 'm'}: {os.strerror(errno.ENOSPC)}")
    assert leftovers(tmp_path, "m") == []


def test_published_folders_follow_the_umask(fam, tmp_path):
    old = os.umask(0o022)
    try:
        out = run_merge(cfg(fam), tmp_path / "m", progress=False)
        x = extract_expert(out, "a", tmp_path / "x")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (x.stat().st_mode & 0o777) == 0o755
