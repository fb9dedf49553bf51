"""Initial retrieval recall of the pretrained MiniLM on the quickstart's knowledge base with and without
aliases (``generate_kb(..., aliases=True)``: passages write last names as code words; issue 18's
end-to-end retriever training task, which wants a low but non-zero starting recall).

For each seed and variant: ``prepare_task`` (MiniLM, exact index, embedding length 32, a tiny generator),
then on the test questions the answer recall@k (a gold answer in the top k passages, DPR's match, as
``rag_jax.quickstart.pipeline.answer_recall``) and the gold-passage recall@k, by exact inner products of
question vectors (question length 16, the quickstart's) with the passage embeddings.

    PYTHONPATH=. python experiments/alias_kb_recall.py --out /tmp/alias_kb --seeds 0 1
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from transformers import AutoTokenizer

from rag_jax.hf.encoder import load_encoder
from rag_jax.models.configs import BartConfig
from rag_jax.quickstart import knowledge_base
from rag_jax.quickstart.task import prepare_task
from rag_jax.retrieval import load_embeddings, read_passages
from rag_jax.training.metrics import has_answer

KS = (5, 20, 50)
TINY_GENERATOR = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64)  # fmt: skip


def top_rows(encoder_dir: str, questions: list[str], embeddings_dir: str, k: int, max_length: int) -> np.ndarray:
    """The rows of the ``k`` passages with the largest inner product with each question's vector."""
    encoder, tokenizer = load_encoder(encoder_dir), AutoTokenizer.from_pretrained(encoder_dir)
    enc = tokenizer(questions, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    queries = np.asarray(encoder.encode(enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)))
    passages = np.asarray(load_embeddings(embeddings_dir, mmap=False), np.float32)
    return np.argsort(-(queries.astype(np.float32) @ passages.T), axis=1)[:, :k]


def recalls(root: str, entities: int, seed: int, aliases: bool) -> dict[str, float]:
    """Answer and gold-passage recall@k of the initial MiniLM on the test questions of one task."""
    paths = prepare_task(root, entities=entities, generator=TINY_GENERATOR, seed=seed, encoder="minilm",
                         index="exact", embed_max_length=32, aliases=aliases, progress=False)  # fmt: skip
    test = knowledge_base.generate_kb(entities, seed, aliases=aliases).test
    rows = top_rows(paths.encoder, [q.question for q in test], paths.embeddings, max(KS), max_length=16)
    texts = [p.text for p in read_passages(paths.passages)]
    out = {}
    for k in KS:
        out[f"answer@{k}"] = float(np.mean([has_answer([texts[i] for i in r[:k]], q.answers) for r, q in zip(rows, test)]))
        out[f"gold@{k}"] = float(np.mean([int(q.passage_id) - 1 in r[:k] for r, q in zip(rows, test)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    header = ["seed", "knowledge base"] + [f"answer@{k}" for k in KS] + [f"gold@{k}" for k in KS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for seed in args.seeds:
        for aliases in (False, True):
            name = "aliased" if aliases else "plain"
            r = recalls(os.path.join(args.out, f"{name}_{seed}"), args.entities, seed, aliases)
            cells = [str(seed), name] + [f"{r[f'answer@{k}']:.3f}" for k in KS] + [f"{r[f'gold@{k}']:.3f}" for k in KS]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
