"""DRS: pure placement and load balancing on a cluster snapshot (no I/O, clock passed in)."""
