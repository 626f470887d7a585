"""Structural changes: whole MLP neurons (neurons), key/value groups of attention heads (heads),
whole blocks (block_removal), and per-block sparsities such as OWL's (layer_sparsity).

Imports: config, disk/, runtime/ and model/.
"""
