"""Host isolation: what co-location really looks like on a node.

Read-only library behind ``katactl inspect cgroup|bvt|memcg|rdt|threads`` and
``katactl audit``. Every file access goes through a NodeTransport with node
paths, so ``--host-root`` and SSH work unchanged. Modules:

- :mod:`.cgroups`  mounts (v1, v2, hybrid), cgroup paths, knob reading, kubelet layouts
- :mod:`.weights`  cpu.shares <-> cpu.weight (the kubelet and the runc formula)
- :mod:`.resctrl`  resctrl groups, schemata decoding, mon_data sampling
- :mod:`.threads`  a process's threads: vCPUs, affinity, cgroup, resctrl group, policy, nice
- :mod:`.report`   bvt / memcg tree reports
- :mod:`.policy`   the audit policy (TOML, koordinator defaults)
- :mod:`.audit`    the checks and their findings

The sandboxes on a node come from :mod:`katactl.sandbox` (``discover``/``resolve``).

A feature the kernel lacks (no ``cpu.bvt_warp_ns``, no resctrl mount, no
Alinux memcg knobs) is reported as *unsupported*, never raised as an error.
"""
