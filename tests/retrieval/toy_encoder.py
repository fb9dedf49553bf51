"""A toy tokenizer and encoder for the embedding-job tests: fast, deterministic, no model files."""

import jax
import jax.numpy as jnp
import numpy as np

SEQ, VOCAB, DIM = 12, 97, 6
TABLE = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)


def tokenize(first, second):
    """A toy tokenizer: word hashes, "[SEP]" = 1 between the pair, padded to SEQ."""
    ids = np.zeros((len(first), SEQ), np.int32)
    for i, a in enumerate(first):
        words = [2 + sum(map(ord, w)) % (VOCAB - 2) for w in a.split()]
        if second is not None:
            words += [1] + [2 + sum(map(ord, w)) % (VOCAB - 2) for w in second[i].split()]
        ids[i, : min(SEQ, len(words))] = words[:SEQ]
    return ids, (ids > 0).astype(np.int32)


@jax.jit
def encode(ids_BxS, mask_BxS):
    """A toy encoder: masked mean of embedding rows."""
    emb_BxSxD = jnp.asarray(TABLE)[ids_BxS] * mask_BxS[..., None]
    return emb_BxSxD.sum(1) / jnp.maximum(mask_BxS.sum(1, keepdims=True), 1)
