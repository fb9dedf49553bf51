"""Subcommands of ``rag-jax``: one module per job, each with ``register(subparsers)``.

A module adds its parsers with ``parser.set_defaults(handler=<function of the parsed args -> int>)``;
``rag_jax.cli`` lists the modules. Heavy imports (jax models, torch-free loaders) stay inside the
run functions so ``rag-jax --help`` is instant.
"""
