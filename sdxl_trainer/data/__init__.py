"""Stage 0, shared by caching and training: image files and captions, aspect buckets, the cache format, and
the dataset and sampler that feed training from the cache."""
