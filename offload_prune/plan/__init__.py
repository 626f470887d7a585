"""The memory plan: what each phase of a run will hold, on the device and the host, before any
weight is read (memory), the micro-batch it fits (micro_batch), Mixture-of-Experts blocks streamed in
expert groups and the group size they fit (expert_groups), and the plan of a task evaluation (evaluation).

Imports: everything below the stream (config, disk/, runtime/, model/, surgery/, methods/).
"""
