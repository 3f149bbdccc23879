"""ditperf.model."""
