"""Structured outputs: constrained decoding through xgrammar (JSON Schema, JSON object, regex, choice, EBNF, and
ChatGLM3 tool calls that always parse).

Layering: between worker and core. It may import core, text and config; worker and runtime import it. xgrammar
itself loads only when the first structured request arrives.
"""
