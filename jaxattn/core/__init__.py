"""Machinery shared by every op, kernel and parallel strategy: validation, masks, online softmax, blocking.

Nothing here imports an op or a kernel, so both may import it (see WORKSPACE.md for the layering).
"""
