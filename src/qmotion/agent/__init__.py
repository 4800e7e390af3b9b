"""The per-host agent: runs VMs under QEMU on its host and serves them over an HTTP API."""
