"""Speed and memory, ours against the alternatives, on the machine at hand."""
