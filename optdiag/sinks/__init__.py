"""Where results go: Lightning loggers, TensorBoard panels, events.jsonl, and the HTML/JSON report."""
