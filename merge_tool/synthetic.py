"""Tiny random base models and experts with structured task vectors, built on the fly.

Used by the tests, the merge-speed benchmark and the small default demo: no model hub is
needed. Experts are made so that clustering has a known right answer: for every output
channel of every channel-merged tensor, the experts are split into `true_groups` groups and
every member of a group gets that group's delta plus a little noise.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from vllm_channelmerge import architectures as archs
from vllm_channelmerge import format as fmt

log = logging.getLogger(__name__)

_WORDS = (
    "the a an of to in and is was for on with as by at from it this that be are or not have "
    "one two three four five six seven eight nine ten add sum math code chat list print return "
    "def if else while true false none number value answer question hello world model expert "
    "merge channel group weight token cat dog sun moon red blue green big small fast slow"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0) -> None:
    """Train a small byte-level BPE tokenizer on generated text and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + f" {rng.randint(0, 999)}"
              for _ in range(2000)]
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def make_base(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random HF model (safetensors + config + tokenizer) of the given architecture."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        train_tokenizer(out, vocab_size=vocab_size, seed=seed)
    spec = archs.BY_SHORT[arch]
    cfg_name, model_name = spec.hf_config, spec.name
    cfg = getattr(transformers, cfg_name)(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        vocab_size=vocab_size, max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        head_dim=hidden_size // num_heads, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Non-trivial norms so that folding them is actually exercised.
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_experts(
    base_dir: str | Path,
    out_dirs: list[str | Path],
    true_groups: int = 2,
    delta_scale: float = 0.04,
    noise: float = 0.1,
    norm_scale: float = 0.05,
    seed: int = 1,
    frozen: tuple[str, ...] = (),
) -> list[Path]:
    """Write one expert per `out_dirs` entry: base + per-channel group deltas (+ noise).

    For channel c of tensor X, expert n belongs to true group `assign[X][c, n]`; its delta is
    `proto[group, c] * (1 + noise * eps)`. Norm weights get small per-expert deltas.
    Returns the expert dirs; the true assignment is written to `<expert>/true_groups.json`
    only for the first expert (tests read it). Tensors whose name contains one of `frozen`
    are left as in the base (as when fine-tuning freezes the embeddings).
    """
    from safetensors.torch import load_file, save_file

    base = Path(base_dir)
    n = len(out_dirs)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for f in sorted(base.glob("*.safetensors")):
        state.update(load_file(str(f)))
    expert_states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    truth: dict[str, list[list[int]]] = {}
    for name, w in state.items():
        wf = w.float()
        if any(f in name for f in frozen):
            for e in range(n):
                expert_states[e][name] = w.clone()
        elif fmt.is_channel_tensor(name):
            out = w.shape[0]
            groups = min(true_groups, n)
            # Each channel: random permutation-based assignment, every group non-empty.
            assign = torch.stack([torch.randperm(n, generator=gen) % groups for _ in range(out)])  # [out, n]
            proto = torch.randn((groups, *w.shape), generator=gen) * delta_scale
            if name.endswith(".weight"):
                truth[name] = assign.tolist()
            for e in range(n):
                g = assign[:, e]
                d = proto[g, torch.arange(out)]
                d = d * (1 + noise * torch.randn(d.shape, generator=gen))
                expert_states[e][name] = (wf + d).to(w.dtype)
        else:
            for e in range(n):
                d = norm_scale * torch.randn(w.shape, generator=gen) if name.endswith("norm.weight") else 0
                expert_states[e][name] = (wf + d).to(w.dtype)
    outs = []
    for e, od in enumerate(out_dirs):
        od = Path(od)
        od.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                (od / f.name).write_bytes(f.read_bytes())
        save_file(expert_states[e], str(od / "model.safetensors"), metadata={"format": "pt"})
        outs.append(od)
    (Path(out_dirs[0]) / "true_groups.json").write_text(json.dumps(truth))
    return outs


def make_family(root: str | Path, names: list[str], arch: str = "llama", true_groups: int = 2,
                seed: int = 0, frozen: tuple[str, ...] = (), **base_kwargs) -> tuple[Path, dict[str, Path]]:
    """Base + named experts under `root` (`root/base`, `root/<name>`)."""
    root = Path(root)
    base = make_base(root / "base", arch=arch, seed=seed, **base_kwargs)
    dirs = make_experts(base, [root / n for n in names], true_groups=true_groups, seed=seed + 1, frozen=frozen)
    return base, dict(zip(names, dirs))
