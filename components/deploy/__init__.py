"""deploy: the champion goes live on the spec's target (components/deploy/settings.py)."""
