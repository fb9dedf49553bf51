"""``rag-jax train``, ``rag-jax eval`` and ``rag-jax export``.

    rag-jax train --config experiments/configs/tiny.py --config.train.steps=200
    rag-jax eval  --run runs/tiny [--split test] [--step N]
    rag-jax export --run runs/tiny --out exported/ [--format hf] [--link-corpus]

Any ``--config.<field>=<value>`` overrides a field of the config file (see
``rag_jax.config.default_config`` for every field). A run directory holds ``config.json`` (the
resolved config), ``checkpoints/``, ``metrics.jsonl`` and TensorBoard events under ``tb/``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from rag_jax.errors import ConfigError, UserError


def load_run_config(load: Callable, source: str, *args):
    """``load(*args)``: a run config; a failure (a missing file, an unknown override, an exception in the
    config file's own code) is a ``ConfigError`` about ``source``."""
    try:
        return load(*args)
    except UserError:
        raise
    except Exception as e:  # a config file is user code: whatever it raises is the user's to fix
        why = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        named = isinstance(e, (OSError, KeyError, ValueError, TypeError))  # config.py's messages say what is wrong
        raise ConfigError(why if named else f"{type(e).__name__}: {why}", where=source) from e


def _train(args: argparse.Namespace) -> int:
    from rag_jax.config import load_config
    from rag_jax.training import loop

    cfg = load_run_config(load_config, args.config, args.config, args.overrides)
    metrics = loop.train(cfg, progress=not args.no_progress)
    print(json.dumps({"run_dir": cfg.run_dir, "dev": metrics}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import jax

    from rag_jax.config import resolve, saved_run_config
    from rag_jax.training import components, evaluate, sharding

    cfg = load_run_config(saved_run_config, args.run, args.run, args.overrides)
    sharding.maybe_initialize_distributed()  # a multi-host evaluation splits the examples over the processes
    question_tokenizer, generator_tokenizer = components.tokenizers(cfg)
    examples = components.read_split(cfg, args.split)  # data mistakes show before the model loads
    model, step = evaluate.load_trained_model(cfg, args.step)
    retriever = None
    if cfg.rag.variant != "closed_book":
        retriever = components.build_retriever(cfg, model, question_tokenizer, generator_tokenizer, k=cfg.eval.k)
    result, records = evaluate.evaluate(cfg, model, examples, generator_tokenizer=generator_tokenizer, retriever=retriever,
                                        fmt=components.split_format(cfg, args.split), progress=jax.process_index() == 0,
                                        mesh=sharding.make_mesh(resolve(cfg).mesh))  # fmt: skip
    out = args.predictions or os.path.join(cfg.run_dir, f"predictions_{args.split}_step{step}.jsonl")
    if jax.process_index() == 0:  # every process holds every record; one writes them
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(json.dumps({"split": args.split, "step": step, **result, "predictions": out}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from rag_jax.config import saved_run_config
    from rag_jax.training.export import export_run

    cfg = load_run_config(saved_run_config, args.run, args.run)
    step, notes = export_run(cfg, args.out, step=args.step, link_corpus=args.link_corpus)
    for note in notes:
        print("note:", note)
    print(f"exported step {step} of {args.run} to {args.out}")
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help="train a RAG (or closed-book BART) model from a config file")
    train.add_argument("--config", required=True, help="path.py or path.py:arg (a file with get_config(arg))")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=_train, overrides_allowed=True)

    evaluate = sub.add_parser("eval", help="evaluate a run's checkpoint on a split (EM, F1, recall@k)")
    evaluate.add_argument("--run", required=True, help="run directory (holds config.json and checkpoints/)")
    evaluate.add_argument("--split", default="dev", choices=("dev", "test", "train"))
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("--predictions", default=None, help="JSONL file for the per-example predictions")
    evaluate.set_defaults(handler=_eval, overrides_allowed=True)

    export = sub.add_parser("export", help="export a run's checkpoint as a transformers RAG folder")
    export.add_argument("--run", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--format", default="hf", choices=("hf",), help="transformers folders (the only format)")
    export.add_argument("--step", type=int, default=None)
    export.add_argument("--link-corpus", action="store_true", help="symlink passages/embeddings/index instead of copying")
    export.set_defaults(handler=_export)
