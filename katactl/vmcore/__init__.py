"""Guest memory dumps (vmcores): find, collect, take and remove them.

The public API is re-exported here; the modules, in import order (each only
imports the ones above it, so there are no cycles):

- :mod:`.records`     the local records of collected dumps: manifests and the collect index
- :mod:`.dumps`       the dumps on a node: guest_memory_dump_path, list, resolve, pod, remove
- :mod:`.streams`     byte plumbing: read-ahead/hash threads, rate limit, plain/gzip/zstd writers
- :mod:`.collection`  collect: copy, resume sidecar, verification, manifest, compression on the
                      node (streamed back, ``--compress-on``) or here, makedumpfile
- :mod:`.capture`     taking dumps: the runtime's panic handler, on-demand triggers

Domain code only: no printing; errors are katactl.errors types.
"""
from katactl.vmcore.capture import FORMATS, TriggerOptions, runtime_panic_dump, trigger
from katactl.vmcore.collection import CollectOptions, collect
from katactl.vmcore.dumps import (check_abs, check_ref, dump_name, dump_timestamp, go_timestamp, list_dumps,
                                  node_zone, remove_dumps, resolve_dumps)
from katactl.vmcore.records import CollectIndex

__all__ = [
    "CollectIndex", "CollectOptions", "FORMATS", "TriggerOptions", "check_abs", "check_ref", "collect",
    "dump_name", "dump_timestamp", "go_timestamp", "list_dumps", "node_zone", "remove_dumps", "resolve_dumps",
    "runtime_panic_dump", "trigger",
]
