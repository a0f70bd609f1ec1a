"""TFDS builder of scikit-learn's digits (`digits`)."""
