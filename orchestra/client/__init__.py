"""The Python client: jobs on this machine (background drivers) or on a
Ray cluster (Ray Jobs), and a finished job's model put to use."""
