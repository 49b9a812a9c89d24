"""`fluxkv-bench`: the load engines, the latency histogram, the report, and what it observes of the
server process."""
