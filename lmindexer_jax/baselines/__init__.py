"""Baseline semantic-ID schemes, written as the indexer's `semantic_ids.tsv` so every run works.

- `random_ids`: uniform random codes of the same shape.
- `hierarchical_kmeans`: DSI's recursive k-means IDs.
- `rq_kmeans`: residual k-means, one level per codebook (as GRID offers).
- `rqvae`: TIGER's RQ-VAE (MLP autoencoder with a residual quantizer).

`embeddings` gives the vectors (mean-pooled frozen T5 encoder states, or a user's `.npy`);
`id_pipeline.make_ids` is the gin job that writes the ID file and `id_stats.json`.
"""
