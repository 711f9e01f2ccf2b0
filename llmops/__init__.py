"""llmops: the command line, the spec and the stage registry."""
