"""ditperf.trainer."""
