"""gunn_jax: Gradually Updated Neural Networks (Qiao et al., ICML 2018)."""
