"""Requests, scheduling and KV blocks: pure Python data and policy, no model, no torch."""
