"""ds-longformer: a DeepSpeed-scaled trainer for the Longformer (Beltagy et al., 2020)."""
