"""``rag-jax plan``: compile a run config's programs ahead of time for a TPU slice or a GPU node,
from abstract shapes only (no weights, no data, no accelerator), and report whether they fit, their
FLOPs, collectives and a roofline estimate (``rag_jax.planning``).

    rag-jax plan --config experiments/configs/paper.py:nq-token --topology v5e:2x4
    rag-jax plan --config experiments/configs/paper.py:nq-sequence --topology h100:8 --out plan.json
    rag-jax plan --config experiments/configs/tiny.py --topology v5e:2x2 --programs train_step

TPU topologies need libtpu (``pip install -r requirements-aot.txt``), GPU ones the CUDA plugin
(``pip install "jax[cuda12]==<jax version>"``, no GPU needed); ``cpu:N`` plans for N CPU devices of
this host. The exit status is 1 when a program does not fit, with what to change.
"""

from __future__ import annotations

import argparse
import sys

from rag_jax.commands.train import load_run_config

DEFAULT_PROGRAMS = "train_step,decode,exact_search"  # decode: the config's variant's decoding


def _programs(spec: str, variant: str) -> list[str]:
    from rag_jax.errors import ConfigError
    from rag_jax.planning.programs import PROGRAMS

    decode = "decode_sequence" if variant == "sequence" else "decode_token"
    names = [decode if name.strip() == "decode" else name.strip() for name in spec.split(",") if name.strip()]
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown:
        raise ConfigError(f"unknown program(s) {', '.join(unknown)}; expected {', '.join(PROGRAMS)} or decode",
                          what="--programs")  # fmt: skip
    if variant == "closed_book":
        names = [n for n in names if n == "train_step"]
    return names


def _plan(args: argparse.Namespace) -> int:
    from rag_jax.config import load_config
    from rag_jax.planning import analysis, programs, report, targets

    config = load_run_config(load_config, args.config, args.config, args.overrides)
    target = targets.target(args.topology)
    model = programs.abstract_rag_model(config)
    plans = []
    for name in _programs(args.programs, config.rag.variant):
        print(f"[plan] compiling {name} for {args.topology} ...", file=sys.stderr, flush=True)
        program = programs.build(name, config, target, model, corpus_size=args.corpus_size, query_batch=args.query_batch)
        plans.append(analysis.analyse(program, target, args.hlo_dir))
    print(report.table(plans, args.topology))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report.to_json(plans, args.topology, args.config))
    too_big = [p for p in plans if not p.fits]
    for p in too_big:
        print(f"rag-jax plan: {report.advice(p)}", file=sys.stderr)
    return 1 if too_big else 0


def register(sub) -> None:
    from rag_jax.planning.targets import TOPOLOGY_HELP

    plan = sub.add_parser("plan", help="compile a config's train step, decoding and index search ahead of time "
                                       "for a TPU/GPU topology: memory, FLOPs, collectives, estimated MFU")  # fmt: skip
    plan.add_argument("--config", required=True, help="path.py or path.py:arg (a file with get_config(arg))")
    plan.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    plan.add_argument("--programs", default=DEFAULT_PROGRAMS,
                      help="comma-separated: train_step, decode (the config's variant), decode_token, "
                           "decode_sequence, exact_search")  # fmt: skip
    plan.add_argument("--corpus-size", type=int, default=21_015_300, help="exact_search: passages in the index")
    plan.add_argument("--query-batch", type=int, default=1024, help="exact_search: questions per search")
    plan.add_argument("--out", default=None, help="write the plan as JSON here")
    plan.add_argument("--hlo-dir", default=None, help="write each compiled program's HLO text here")
    plan.set_defaults(handler=_plan, overrides_allowed=True)
