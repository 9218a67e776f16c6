"""Images and prompts -> model inputs: the tokenizer and the processor."""
