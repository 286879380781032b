"""Text in and out: the ChatGLM3 tokenizer, chat prompts, tool calls, streaming detokenization and stop strings."""
