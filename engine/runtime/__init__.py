"""Where the engine runs: the engine core's step loop, its output processing, and the async engine that frontends talk
to (in-process or with the engine core in its own process)."""
