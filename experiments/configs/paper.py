"""The paper's open-domain QA settings (Lewis et al. 2020, section 4.1 and appendix B).

    rag-jax train --config experiments/configs/paper.py:nq-token
    rag-jax train --config experiments/configs/paper.py:tqa-sequence@/data/rag

``arg`` is ``<dataset>-<variant>[@<data root>]``: dataset in nq, tqa, wq, ct; variant in token,
sequence, closed_book (BART-large alone); the data root defaults to ``data``. Layout under it (see experiments/README.md for where to
get each file and the embed / build-index commands):

    psgs_w100.tsv                      21,015,300 Wikipedia passages (DPR)
    embeddings/                        `rag-jax embed` output (DPR multiset context encoder)
    index/                             `rag-jax build-index` output (ScaNN, sharded if needed)
    <dataset>/{train,dev,test}.tsv     question<TAB>["answer", ...] (DPR's qas files)

Models: local folders or hub ids (where the network exists); `rag-jax plan` needs neither (the hub ids
below resolve to built-in shapes). The paper trains with k = 5 or 10
documents on 8 x 32 GB GPUs, batch 128 (we use accumulation where the mesh is smaller), Adam, mixed
precision; test-time decoding: RAG-Token 15 docs, RAG-Sequence 50 docs thorough, greedy (beam 1)
for QA.
"""

from rag_jax.config import default_config

DATASETS = ("nq", "tqa", "wq", "ct")
VARIANTS = ("token", "sequence", "closed_book")
TEST_DOCS = {"token": 15, "sequence": 50, "closed_book": 0}


def get_config(arg: str = "nq-token"):
    arg, _, root = arg.partition("@")
    root = root or "data"
    dataset, _, variant = arg.partition("-")
    if dataset not in DATASETS or variant not in VARIANTS:
        raise ValueError(f"config arg {arg!r}: expected <{'|'.join(DATASETS)}>-<{'|'.join(VARIANTS)}>")
    c = default_config()
    c.run_dir = f"runs/{dataset}-{variant}"
    c.data.train = f"{root}/{dataset}/train.tsv"
    c.data.dev = f"{root}/{dataset}/dev.tsv"
    c.data.test = f"{root}/{dataset}/test.tsv"
    c.data.max_question_length = 64
    c.data.max_source_length = 128  # the reference recipe's source length
    c.data.max_target_length = 25  # and target length
    c.corpus.passages = f"{root}/psgs_w100.tsv"
    c.corpus.embeddings = f"{root}/embeddings"
    c.corpus.index = f"{root}/index"
    c.model.question_encoder = "facebook/dpr-question_encoder-multiset-base"
    c.model.generator = "facebook/bart-large"
    c.rag.variant = variant
    c.rag.k = 10 if variant == "sequence" else 5
    c.rag.max_combined_length = 300
    c.train.steps = 40_000
    c.train.batch_size = 128
    c.train.learning_rate = 3e-5
    c.train.warmup_steps = 500
    c.train.weight_decay = 0.001
    c.train.clip_norm = 0.1
    c.train.epsilon = 0.1
    c.train.compute_dtype = "bfloat16"
    # accelerator layout: parameters and optimizer state sharded over every device (FSDP), each layer's
    # activations recomputed in the backward pass; `rag-jax plan` shows this fits v5e-8 and H100 x8
    c.train.remat = True
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, -1, 1
    c.train.eval_every = 2_000
    c.train.save_every = 2_000
    c.train.best_metric = "em"
    c.eval.k = TEST_DOCS[variant]
    c.eval.num_beams = 1
    c.eval.max_length = 25
    c.eval.decoding = "thorough"
    if dataset == "ct":  # CuratedTrec's answers are regular expressions: EM (and recall) by regex, as DPR
        c.eval.answer_match = "regex"
    return c
