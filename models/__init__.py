"""Flax NNX model zoo built on the jaxattn ops. Installed as `jaxattn.models`."""
