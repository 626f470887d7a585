"""What the compute needs besides the model: the activation caches between blocks (activations), host
memory behaviour (hostmem), helper threads that read ahead and write behind (overlap), torchrun ranks
(distributed), mask selection (masks), the Hessian sums (hessian_sums) and each phase's time and
peak memory (meter).

Imports: config and disk/.
"""
