"""The checkpoint on disk and the run's own files: reading safetensors shards (checkpoint; a
compressed-tensors pack-quantized one read as dense weights: compressed; a block-scaled FP8 one,
read dense and written back as FP8: fp8), the map
between model parameters and checkpoint tensors (tensormap), the durable commit protocol where every
filesystem change is a numbered step (durable), the run state and its manifest (runstate), and the
disk-space check (diskspace).

Imports: the package's basics and config only.
"""
