"""The per-host agent: runs VMs under QEMU on its host and serves them over an HTTP API.

Rooms, top to bottom: ``app`` (the API) over ``migration/`` over ``disks/`` over ``vms/`` over
``facts`` over ``network/``; ``config``, ``tls`` and ``errors`` are the base every room uses.
May import ``qmotion.hypervisor``, ``qmotion.migration`` (parameters and constants),
``qmotion.image``, ``qmotion.pki`` and the ground floor; never the manager or the lab, which
reach it only over HTTP.
"""
