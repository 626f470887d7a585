"""The memory plan: what each phase of a run will hold, on the device and the host, before any
weight is read (memory).

Imports: everything below the stream (config, disk/, runtime/, model/, surgery/, methods/).
"""
