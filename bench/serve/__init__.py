"""``glmserve-bench serve``: the load-test harness for a running server."""
