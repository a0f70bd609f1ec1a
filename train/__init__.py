"""Training loop: `python -m train.main --config configs/<model>.py`. Installed as `jaxattn.train`."""
