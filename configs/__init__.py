"""Training configurations, one file per model family (ml_collections). Installed as `jaxattn.configs`."""
