"""Tiny random transformers models for parity tests (built from configs, saved to disk)."""

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

VOCAB = 61
RAG_CLASSES = {"token": RagTokenForGeneration, "sequence": RagSequenceForGeneration}


def tiny_dpr_config(**overrides) -> DPRConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    kw.update(overrides)
    return DPRConfig(**kw)


def tiny_bart_config(**overrides) -> BartConfig:
    kw = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    )  # fmt: skip
    kw.update(overrides)
    return BartConfig(**kw)


def tiny_rag(variant: str = "token", seed: int = 0, n_docs: int = 5, init_std: float = 0.2, **rag_kwargs):
    """A random torch ``Rag{Token,Sequence}ForGeneration`` in eval mode. A larger init_std than
    transformers' 0.02 makes logits far from uniform, so mistakes show."""
    torch.manual_seed(seed)
    question_encoder = DPRQuestionEncoder(tiny_dpr_config(initializer_range=init_std))
    generator = BartForConditionalGeneration(tiny_bart_config(init_std=init_std))
    with torch.no_grad():
        generator.final_logits_bias.normal_(0.0, 0.5)
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=n_docs, **rag_kwargs
    )
    model = RAG_CLASSES[variant](config, question_encoder=question_encoder, generator=generator)
    return model.eval()
