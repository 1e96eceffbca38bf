"""Workers: one OpenAI-compatible server per GPU that batches left-padded requests itself."""
