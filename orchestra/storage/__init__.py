"""Shared storage: a folder per job, its record and state machine, the
driver's heartbeat, and the status lines a remote client reads."""
