"""TFDS builder of the Python standard library's source files as bytes (`stdlib_bytes`)."""
