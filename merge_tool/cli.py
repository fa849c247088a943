"""`channelmerge` command line: merge, inspect, extract, make-synthetic, router, serve.

Errors a user can fix (bad config, bad input, existing output, an I/O error such as a full
disk or a read-only folder) are printed as one line `channelmerge: error: ...` with exit
status 2, without a traceback. SIGTERM and Ctrl-C stop a command cleanly: its temporary
output folder is removed (exit status 143 and 130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from vllm_channelmerge import architectures as archs
from vllm_channelmerge import format as fmt

if TYPE_CHECKING:
    from merge_tool.config import MergeConfig
    from merge_tool.plan import MergePlan

log = logging.getLogger("channelmerge")


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException (like KeyboardInterrupt) so that every `finally` and
    the staged output's cleanup run on the way out, and no `except Exception` swallows it."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while a command runs (the default action would kill the
    process without removing its temporary folder); the previous handler is restored after.
    Only the first SIGTERM raises: a second one must not interrupt the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, _frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _merge(args: argparse.Namespace) -> int:
    from merge_tool.config import load_config
    from merge_tool.inspect import format_table, inspect_checkpoint
    from merge_tool.merge import run_merge

    cfg = load_config(args.config)
    if cfg.router is not None:  # check the examples before the (long) merge
        _read_router_examples(Path(cfg.router.examples), cfg.expert_names)
    if args.dry_run:
        return _merge_dry_run(cfg, args)
    out = run_merge(cfg, args.out, force=args.force, device=args.device, progress=not args.quiet,
                    threads=args.threads or None, on_plan=_print_allocation)
    info = inspect_checkpoint(out)
    ratio = info["params_ratio"]
    errs = [t["rel_error_mean"] for t in info["tensors"] if t["kind"] == "channel"]
    v2 = f" (format v2, budget: {_budget_text(info['budget'])})" if info.get("budget") else ""
    print(f"wrote {out}: {len(info['experts'])} experts, K={info['num_groups']}, method={info['method']}, "
          f"parameters {ratio:.3f} of the ensemble{v2}, mean relative error {sum(errs) / max(1, len(errs)):.4f}")
    for n in info["notes"]:
        print(f"note: {n}")
    if args.verbose:
        print(format_table(info))
    if cfg.router is not None:
        _train_router_into(Path(out), Path(cfg.router.examples), force=True)
    return 0


def _print_allocation(plan: "MergePlan") -> None:
    """A merge under a budget: the rows per channel, before anything is written."""
    from merge_tool.plan import format_allocation

    if plan.allocation is not None:
        print("\n".join(format_allocation(plan)), flush=True)


def _budget_text(b: dict) -> str:
    asked = f"{b['params_ratio']}" if "params_ratio" in b else f"{b['bytes']:,} bytes"
    return f"{asked}, criterion {b['criterion']}"


def _merge_dry_run(cfg: MergeConfig, args: argparse.Namespace) -> int:
    """`merge --dry-run`: validate as the merge does, print its plan, write nothing."""
    from merge_tool.merge import plan_merge
    from merge_tool.plan import format_plan

    plan = plan_merge(cfg, args.out, force=args.force, device=args.device, progress=not args.quiet)
    print(format_plan(plan, per_tensor=args.verbose))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from merge_tool.inspect import format_table, inspect_checkpoint

    info = inspect_checkpoint(args.dir)
    print(json.dumps(info, indent=1) if args.json else format_table(info))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from merge_tool.extract import extract_expert

    out = extract_expert(args.dir, args.name, args.out, force=args.force)
    print(f"wrote {out}: dense checkpoint of expert {args.name!r}")
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    import yaml

    from merge_tool.synthetic import make_family

    root = Path(args.root)
    if root.exists() and any(root.iterdir()) and not args.force:
        raise FileExistsError(f"{root} exists and is not empty; pass --force to write into it")
    base, experts = make_family(root, list(args.experts), arch=args.arch, true_groups=args.true_groups,
                                seed=args.seed, tie_word_embeddings=args.tied)
    cfg = {"base_model": "base", "experts": [{"name": n, "model": n} for n in experts],
           "num_groups": min(2, len(experts)), "similarity": "cosine", "method": "average",
           "fold_norms": True, "dtype": "auto"}
    (root / "merge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"wrote base and {len(experts)} experts ({args.arch}) under {root}; merge config: {root / 'merge.yaml'}")
    return 0


def _examples_label_lines(path: Path) -> dict[str, int]:
    """First line of each expert label in an examples file (for error messages)."""
    first: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("expert"), str):
                first.setdefault(row["expert"], ln)
    return first


def _read_router_examples(path: Path, experts: list[str]) -> dict[str, list[str]]:
    """The examples file, every label checked against `experts` (errors name file and line)."""
    from merge_tool.router_train import load_examples_jsonl
    from vllm_channelmerge.router import RouterError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: examples file not found")
    examples = load_examples_jsonl(path)
    lines = _examples_label_lines(path)
    for name in examples:
        if name not in experts:
            raise RouterError(f"{path}:{lines.get(name, '?')}: field 'expert': {name!r} is not an expert "
                              f"of the checkpoint (experts: {', '.join(experts)})")
    return examples


def _router_train(args: argparse.Namespace) -> int:
    return _train_router_into(Path(args.dir), Path(args.examples), force=args.force)


def _train_router_into(merged: Path, path: Path, force: bool) -> int:
    from merge_tool.io import check_not_overlapping, check_replaceable, staged_dir
    from merge_tool.router_train import train_router
    from vllm_channelmerge.router import Router, router_dir, router_dir_problem

    experts = fmt.read_checkpoint_config(merged).experts
    given = router_dir(merged).expanduser().absolute()
    # router/ lives inside the checkpoint, but must not be (or hold) the checkpoint or the
    # examples file, however the paths are spelled (a router/ symlink, `..`).
    check_not_overlapping(given, [("the merged checkpoint", merged.expanduser().absolute()),
                                  ("the examples file", path.expanduser().absolute())],
                          FileExistsError, allow_inside=True)
    target = Path(os.path.realpath(given))
    if os.path.lexists(target):
        if not force:
            raise FileExistsError(f"{given} already exists; pass --force to replace it")
        check_replaceable(target, router_dir_problem)
    examples = _read_router_examples(path, experts)
    missing = [e for e in experts if e not in examples]
    try:
        router = train_router(examples)
    except ImportError as e:
        raise RuntimeError(f"training a router needs scikit-learn: {e}") from None

    # Write beside the target and check that it loads before it replaces the old one.
    with staged_dir(target, force=force, own=router_dir_problem) as tmp:
        router.write_files(tmp)
        Router.load(tmp, experts=experts)

    texts = [t for n in examples for t in examples[n]]
    labels = [n for n in examples for _ in examples[n]]
    pred = router.predict(texts)
    right = sum(p == y for p, y in zip(pred, labels))
    print(f"wrote {given}: {len(texts)} examples, training accuracy {right / len(texts):.3f}")
    for n in router.experts:
        idx = [i for i, y in enumerate(labels) if y == n]
        ok = sum(pred[i] == n for i in idx)
        print(f"  {n}: {len(idx)} examples, {ok / len(idx):.3f} routed back to it")
    if missing:
        print(f"note: no examples for {', '.join(missing)}: model 'auto' never picks "
              f"{'it' if len(missing) == 1 else 'them'}")
    return 0


def _router_predict(args: argparse.Namespace) -> int:
    from vllm_channelmerge.router import Router, router_dir

    experts = fmt.read_checkpoint_config(args.dir).experts
    router = Router.load(router_dir(args.dir), experts=experts)
    for name in router.predict(list(args.text)):
        print(name)
    return 0


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Replace this process by the plugin's launcher: the merge tool never imports the runtime."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("serving needs vLLM and the channelmerge plugin (pip install 'channelmerge[cpu]' "
                           "or 'channelmerge[gpu]')")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "vllm_channelmerge.serve", args.dir, *rest])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="channelmerge", description=(
        "Channel-merge N fine-tuned experts of one base model into one checkpoint, and serve it."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tables")
    sub = p.add_subparsers(dest="cmd", required=True)

    from merge_tool.methods import help_text  # the methods and parameters, from their registry

    m = sub.add_parser("merge", help="merge experts as described by a merge.yaml", epilog=help_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help="merge config (YAML), see docs/merge-config.md")
    m.add_argument("out", help="output folder (must not exist unless --force)")
    m.add_argument("--force", action="store_true",
                   help="replace OUT if it is a previous channelmerge merge (or empty); nothing else")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the math runs")
    m.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the math (default 1: the merge is memory-bound; 0 = torch default)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.add_argument("--dry-run", action="store_true",
                   help="validate the config, inputs and output path, print the merge plan (per tensor "
                        "kind and layer: jobs, K, output size; totals), and write nothing (-v: every tensor)")
    m.set_defaults(fn=_merge)

    i = sub.add_parser("inspect", help="show experts, K, parameters and errors of a merged checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(fn=_inspect)

    e = sub.add_parser("extract", help="write one expert as a dense HF checkpoint")
    e.add_argument("dir")
    e.add_argument("name", help="expert name")
    e.add_argument("out")
    e.add_argument("--force", action="store_true",
                   help="replace OUT if it is a previous channelmerge extract (or empty); nothing else")
    e.set_defaults(fn=_extract)

    s = sub.add_parser("make-synthetic", help="write a tiny random base + experts and a merge.yaml")
    s.add_argument("root")
    s.add_argument("--experts", nargs="+", default=["math", "code", "chat"])
    s.add_argument("--arch", default="llama", choices=sorted(archs.BY_SHORT))
    s.add_argument("--true-groups", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tied", action="store_true", help="tie the embeddings")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=_make_synthetic)

    r = sub.add_parser("router", help="train or query the `auto` router stored in a merged checkpoint")
    rsub = r.add_subparsers(dest="router_cmd", required=True)
    rt = rsub.add_parser("train", help="train the router from example prompts per expert (writes DIR/router/)")
    rt.add_argument("dir", help="merged checkpoint")
    rt.add_argument("examples", help='JSON lines: {"expert": NAME, "prompt": TEXT} or {"expert": NAME, "messages": [...]}')
    rt.add_argument("--force", action="store_true", help="replace an existing router")
    rt.set_defaults(fn=_router_train)
    rp = rsub.add_parser("predict", help="print the expert the router picks for each text")
    rp.add_argument("dir", help="merged checkpoint with a router")
    rp.add_argument("text", nargs="+")
    rp.set_defaults(fn=_router_predict)

    v = sub.add_parser("serve", help="serve a merged checkpoint with vLLM (other args go to vLLM)")
    v.add_argument("dir")
    v.set_defaults(fn=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "serve" or (len(argv) > 1 and argv[1] == "serve" and argv[0] in ("-v", "--verbose")):
        # Everything after DIR belongs to vLLM: do not let argparse look at it.
        pos = argv.index("serve")
        if len(argv) <= pos + 1:
            parser.parse_args(argv)  # prints usage and exits
        args = parser.parse_args(argv[:pos + 2])
        rest = argv[pos + 2:]
    else:
        args, rest = parser.parse_args(argv), []
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from merge_tool.config import ConfigError
    from merge_tool.io import InputError
    from vllm_channelmerge.format import FormatError

    try:
        if args.cmd == "serve":
            return _serve(args, rest)
        with _sigterm_raises():
            return int(args.fn(args))
    except (ConfigError, InputError, FormatError, RuntimeError) as e:
        print(f"channelmerge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"channelmerge: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("channelmerge: terminated by SIGTERM; the unfinished output was removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("channelmerge: interrupted; the unfinished output was removed", file=sys.stderr)
        return 128 + signal.SIGINT


def _os_error_line(e: OSError) -> str:
    """`<path>: <cause>` for an OSError (ours carry a full message and no errno)."""
    if e.filename is None or not e.strerror:
        return str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {e.strerror}"


if __name__ == "__main__":
    sys.exit(main())
