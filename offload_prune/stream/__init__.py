"""A pruning run, block by block: the run set up and its phases (pipeline), the blocks pruned (blocks), or
pruned expert group by expert group (expert_blocks), a method group's prune (solving), what every phase
shares (passes), the tensors and files written besides the blocks (output), runs that remove whole blocks
(removal_pass), and the report with its per-phase memory meter (report).

Imports: every other subpackage; only the package root (cli, api, demo) imports it.
"""
