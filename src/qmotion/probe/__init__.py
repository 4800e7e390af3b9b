"""Probes of a guest from the network: TCP echo, the echo stream's blackout, memory and disk checks.

They run wherever the network view is right (``qmotion lab exec client -- qmotion probe ...``)
and speak the built guest's protocols (see image/guest/qmguest.c). The ground floor: imports
nothing of qmotion, so the guest image and the benchmarks can use the same ports.
"""
