"""The paper's task families (Lewis et al. 2020, section 4 and appendix B), one config per dataset.

    rag-jax train --config experiments/configs/paper.py:nq-token
    rag-jax train --config experiments/configs/paper.py:jeopardy-sequence@/data/rag

``arg`` is ``<dataset>-<variant>[@<data root>]``: variant in token, sequence, closed_book (BART-large
alone); the data root defaults to ``data``. Datasets, their files under the root and their metrics
(experiments/README.md says where each file comes from):

    nq, tqa      open-domain QA        <dataset>/{train,dev,test}.tsv      EM (SQuAD-normalised)
    wq, ct       open-domain QA        <dataset>/{train,dev}.json.gz        EM (CuratedTrec: regex match)
                                       + <dataset>/test.tsv
    msmarco      abstractive QA        msmarco/{train,dev,test}.jsonl       BLEU-1, ROUGE-L
    jeopardy     question generation   jeopardy/{train,dev,test}.jsonl      Q-BLEU-1, BLEU-1
    fever3       fact verification     fever/{train,dev,test}.jsonl         label accuracy (3 classes)
    fever2       fact verification     the same files, NOT ENOUGH INFO left out (2 classes)

and the shared corpus:

    psgs_w100.tsv                      21,015,300 Wikipedia passages (DPR)
    embeddings/                        `rag-jax embed` output (DPR multiset context encoder)
    index/                             `rag-jax build-index` output (ScaNN, sharded if needed)

Test-time retrieval and decoding follow appendix B: QA with 15 documents for RAG-Token and 50 for
RAG-Sequence (thorough decoding), greedy; MS-MARCO and Jeopardy with 10 documents for both, beam 4,
fast decoding for RAG-Sequence. FEVER is generation of the label string (the paper's "class labels
as output tokens", trained on claim-label pairs), scored by label accuracy; the paper gives no test
k or beam for it, so it keeps the training k and decodes greedily. Training k is 5 (RAG-Token) or 10
(RAG-Sequence), "k in {5, 10}" in the paper, except MS-MARCO and Jeopardy, trained with the 10 they
are tested with. Target lengths (the paper is silent): 25 tokens for QA (the reference recipe's),
64 for MS-MARCO answers, 40 for Jeopardy questions, 8 for FEVER labels.

Models: local folders or hub ids (where the network exists); `rag-jax plan` needs neither (the hub ids
below resolve to built-in shapes). The paper trains on 8 x 32 GB GPUs, batch 128 (we use accumulation
where the mesh is smaller), Adam, mixed precision.
"""

import dataclasses

from rag_jax.config import default_config

VARIANTS = ("token", "sequence", "closed_book")


@dataclasses.dataclass(frozen=True)
class Task:
    """One dataset's files and evaluation (see the module docstring)."""

    folder: str
    train_file: str  # the train and dev files' name pattern ("{split}" filled in); the test file's below
    test_file: str
    train_docs: dict  # k in training, per variant
    test_docs: dict  # k at test time, per variant
    num_beams: int
    sequence_decoding: str  # RAG-Sequence's decoding: thorough | fast
    max_target_length: int
    best_metric: str
    answer_match: str = "string"
    labels: str = ""


QA_DOCS = ({"token": 5, "sequence": 10}, {"token": 15, "sequence": 50})
GENERATION_DOCS = ({"token": 10, "sequence": 10}, {"token": 10, "sequence": 10})
FEVER_DOCS = ({"token": 5, "sequence": 10}, {"token": 5, "sequence": 10})
TASKS = {
    "nq": Task("nq", "{split}.tsv", "test.tsv", *QA_DOCS, 1, "thorough", 25, "em"),
    "tqa": Task("tqa", "{split}.tsv", "test.tsv", *QA_DOCS, 1, "thorough", 25, "em"),
    "wq": Task("wq", "{split}.json.gz", "test.tsv", *QA_DOCS, 1, "thorough", 25, "em"),
    "ct": Task("ct", "{split}.json.gz", "test.tsv", *QA_DOCS, 1, "thorough", 25, "em", answer_match="regex"),
    "msmarco": Task("msmarco", "{split}.jsonl", "test.jsonl", *GENERATION_DOCS, 4, "fast", 64, "rouge_l"),
    "jeopardy": Task("jeopardy", "{split}.jsonl", "test.jsonl", *GENERATION_DOCS, 4, "fast", 40, "q_bleu1"),
    "fever3": Task("fever", "{split}.jsonl", "test.jsonl", *FEVER_DOCS, 1, "thorough", 8, "label_accuracy"),
    "fever2": Task("fever", "{split}.jsonl", "test.jsonl", *FEVER_DOCS, 1, "thorough", 8, "label_accuracy",
                   labels="SUPPORTS,REFUTES"),
}  # fmt: skip
DATASETS = tuple(TASKS)


def get_config(arg: str = "nq-token"):
    arg, _, root = arg.partition("@")
    root = root or "data"
    dataset, _, variant = arg.partition("-")
    if dataset not in TASKS or variant not in VARIANTS:
        raise ValueError(f"config arg {arg!r}: expected <{'|'.join(DATASETS)}>-<{'|'.join(VARIANTS)}>")
    task = TASKS[dataset]
    c = default_config()
    c.run_dir = f"runs/{dataset}-{variant}"
    folder = f"{root}/{task.folder}"
    c.data.train = f"{folder}/{task.train_file.format(split='train')}"
    c.data.dev = f"{folder}/{task.train_file.format(split='dev')}"
    c.data.test = f"{folder}/{task.test_file}"
    c.data.labels = task.labels
    c.data.max_question_length = 64
    c.data.max_source_length = 128  # the reference recipe's source length
    c.data.max_target_length = task.max_target_length
    c.corpus.passages = f"{root}/psgs_w100.tsv"
    c.corpus.embeddings = f"{root}/embeddings"
    c.corpus.index = f"{root}/index"
    c.model.question_encoder = "facebook/dpr-question_encoder-multiset-base"
    c.model.generator = "facebook/bart-large"
    c.rag.variant = variant
    c.rag.k = task.train_docs.get(variant, 5)
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
    c.train.best_metric = task.best_metric
    c.eval.k = task.test_docs.get(variant, 0)
    c.eval.num_beams = task.num_beams
    c.eval.max_length = task.max_target_length
    c.eval.decoding = task.sequence_decoding
    c.eval.answer_match = task.answer_match  # CuratedTrec's answers are regular expressions: EM by regex, as DPR
    return c
