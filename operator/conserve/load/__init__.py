"""`conserve load`: replay a workload (a Mooncake slice, Azure, agentic) against the router, and report."""
