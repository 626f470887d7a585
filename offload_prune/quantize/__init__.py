"""Quantization after the mask: the integer grid and its scales (grid.py), GPTQ's column sweep (gptq.py),
the compressed-tensors checkpoint the quantized blocks are written as (checkpoint.py), and what it adds
to the memory plan (memory.py).

Imports: config, disk/ (the install hint its reader shares), model/ and methods/ (SparseGPT's factorisation and Hessian collector); the
compressed-tensors package where it is needed, with a one-line refusal when it is not installed.
"""
