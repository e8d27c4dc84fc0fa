"""Models: the attention switch, pooling, loading and the Embedder."""
