"""The driver: one process that owns a job from its record to its end.

    preflight → run (Ray Train workers or the in-process run, the
    coordinator answering them) → the record's last state

`main` is its entry point (`python -m orchestra.driver run|resume`);
`resume` reopens stopped jobs; `signals` makes Ctrl-C and SIGTERM a clean stop.
"""
