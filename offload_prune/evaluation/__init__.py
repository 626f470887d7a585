"""Evaluating a model streamed block by block, in the memory it was pruned in: perplexity.

Imports: everything up to plan/ and data/.
"""
