"""The checkpoint on disk and the run's own files: reading safetensors shards (checkpoint; a
compressed-tensors pack-quantized one read as dense weights: compressed), the map
between model parameters and checkpoint tensors (tensormap), the durable commit protocol where every
filesystem change is a numbered step (durable), the run state and its manifest (runstate), and the
disk-space check (diskspace).

Imports: the package's config only.
"""
