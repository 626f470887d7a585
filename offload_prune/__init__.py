"""offload-prune: prune large language models block by block, streamed from safetensors shards."""
__version__ = "0.1.0"
