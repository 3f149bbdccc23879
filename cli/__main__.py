from ditperf.cli.main import entry

entry()
