"""ditperf.export."""
