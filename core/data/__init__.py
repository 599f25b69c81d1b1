"""Data: the generated corpus, sources users bring, images, webdataset shards, the training loader
and its augmented views, and Great Expectations validation."""
