"""Evaluating a model streamed block by block, in the memory it was pruned in: perplexity (perplexity),
and lm-evaluation-harness tasks (tasks), whose requests are packed into windows (requests), scored by the
stream with resume (scoring) behind lm-eval's model interface (harness, which needs the eval extra).

Imports: everything up to plan/ and data/.
"""
