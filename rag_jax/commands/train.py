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


def _train(args: argparse.Namespace) -> int:
    from rag_jax.config import load_config
    from rag_jax.training import loop

    cfg = load_config(args.config, args.overrides)
    metrics = loop.train(cfg, progress=not args.no_progress)
    print(json.dumps({"run_dir": cfg.run_dir, "dev": metrics}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rag_jax.config import saved_run_config
    from rag_jax.training import components, evaluate

    cfg = saved_run_config(args.run, args.overrides)
    model, step = evaluate.load_trained_model(cfg, args.step)
    question_tokenizer, generator_tokenizer = components.tokenizers(cfg)
    retriever = None
    if cfg.rag.variant != "closed_book":
        retriever = components.build_retriever(cfg, model, question_tokenizer, generator_tokenizer, k=cfg.eval.k)
    examples = components.read_split(cfg, args.split)
    result, records = evaluate.evaluate(cfg, model, examples, generator_tokenizer=generator_tokenizer, retriever=retriever)
    out = args.predictions or os.path.join(cfg.run_dir, f"predictions_{args.split}_step{step}.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(json.dumps({"split": args.split, "step": step, **result, "predictions": out}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from rag_jax.config import saved_run_config
    from rag_jax.training.export import export_run

    if args.format != "hf":
        raise ValueError(f"--format {args.format!r}: only 'hf' is supported")
    step, notes = export_run(saved_run_config(args.run), args.out, step=args.step, link_corpus=args.link_corpus)
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
    export.add_argument("--format", default="hf")
    export.add_argument("--step", type=int, default=None)
    export.add_argument("--link-corpus", action="store_true", help="symlink passages/embeddings/index instead of copying")
    export.set_defaults(handler=_export)
