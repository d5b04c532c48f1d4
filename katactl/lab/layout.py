"""Lay out a Kata node's sandbox state on disk, with the real field names.

Used by the lab (``katactl lab up``), by tests and by benches to build node
trees under a root directory that katactl then reads with ``--host-root``.

- Go runtime: ``<root>/run/vc/sbs/<id>/persist.json`` (persistapi
  ``SandboxState``: ``PersistVersion``, ``State``, ``HypervisorState``,
  ``Config.HypervisorConfig`` ...), ``<root>/run/vc/vm/<id>/`` (QEMU ``pid``
  file; ``qmp.sock``/``clh-api.sock`` live here) or, for Firecracker (jailed),
  ``<root>/run/vc/firecracker/<id[:32]>/root/run/firecracker.socket`` (the Go runtime
  truncates the id there to fit the socket path in sun_path).
- runtime-rs: ``<root>/run/kata/<id>/state.json`` (jailed Firecracker:
  ``/run/kata/firecracker/<id>/root/state.json``) with ``sandbox_type``, ``resource``,
  ``hypervisor{hypervisor_type, pid: null, api_socket: "", run_dir, config{flat}}``,
  and the shim's pid in ``<bundle>/shim.pid`` (see :func:`write_rs_sandbox`).
- direct-assigned volumes: ``<root>/run/kata-containers/shared/direct-volumes/
  <base64url(volume path)>/mountInfo.json`` (``kata-runtime direct-volume add``).
- the sandbox's OCI bundle with CRI annotations: containerd
  (``/run/containerd/io.containerd.runtime.v2.task/k8s.io/<id>/config.json``)
  or CRI-O (``/run/containers/storage/overlay-containers/<id>/userdata/config.json``).

Every writer returns a :class:`SandboxPaths` with both *node paths* (what
katactl sees through ``--host-root``) and *real paths* (where to bind a test
server's socket). Sockets themselves are not created here: bind a
:class:`katactl.lab.shimserver.ShimServer` (or a QEMU) on ``real(...)`` paths.

Differences from a real node (on purpose): no ``<container-id>/persist.json``
unless ``container_ids`` is given; PIDs are whatever the caller passes (the
lab passes its own processes' PIDs); no network/devices state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid as _uuid

CONTAINERD_TASK_DIR = "/run/containerd/io.containerd.runtime.v2.task"
CRIO_DIR = "/run/containers/storage/overlay-containers"
GO_SBS = "/run/vc/sbs"
GO_VM = "/run/vc/vm"
RS_DIR = "/run/kata"
SHIM_SOCKET_NAME = "shim-monitor.sock"

#: Go HypervisorState.Type / Config.HypervisorType values
GO_HYPERVISOR_TYPES = {"qemu": "qemu", "clh": "clh", "fc": "firecracker", "firecracker": "firecracker",
                       "dragonball": "dragonball"}
#: runtime-rs hypervisor_type values
#: (Cloud Hypervisor is "clh" from 3.30, "cloud-hypervisor" before: see write_rs_sandbox)
RS_HYPERVISOR_TYPES = {"qemu": "qemu", "clh": "clh", "fc": "firecracker",
                       "firecracker": "firecracker", "dragonball": "dragonball"}

DEFAULT_KERNEL = "/opt/kata/share/kata-containers/vmlinux.container"
DEFAULT_IMAGE = "/opt/kata/share/kata-containers/kata-containers.img"
DEFAULT_HYPERVISOR_PATHS = {"qemu": "/opt/kata/bin/qemu-system-x86_64",
                            "clh": "/opt/kata/bin/cloud-hypervisor",
                            "fc": "/opt/kata/bin/firecracker",
                            "dragonball": ""}


@dataclasses.dataclass
class SandboxPaths:
    """Where one laid-out sandbox lives. ``*_node`` are node paths; the others real paths."""

    root: str
    sandbox_id: str
    runtime: str
    state_dir_node: str
    state_file_node: str
    shim_socket_node: str
    api_socket_node: str | None
    bundle_node: str | None
    vm_dir_node: str | None = None
    pid_file_node: str | None = None
    extra_monitor_socket_node: str | None = None

    def real(self, node_path: str | None) -> str | None:
        """Where a node path lies under the lab root (None stays None)."""
        return _join(self.root, node_path) if node_path else None

    @property
    def shim_socket(self) -> str:
        return _join(self.root, self.shim_socket_node)

    @property
    def api_socket(self) -> str | None:
        return self.real(self.api_socket_node)

    @property
    def extra_monitor_socket(self) -> str | None:
        return self.real(self.extra_monitor_socket_node)

    @property
    def state_file(self) -> str:
        return _join(self.root, self.state_file_node)

    @property
    def state_dir(self) -> str:
        return _join(self.root, self.state_dir_node)

    @property
    def bundle(self) -> str | None:
        return self.real(self.bundle_node)


def hv_key(hypervisor: str) -> str:
    h = {"firecracker": "fc", "cloud-hypervisor": "clh", "cloud_hypervisor": "clh"}.get(hypervisor, hypervisor)
    if h not in ("qemu", "clh", "fc", "dragonball"):
        raise ValueError(f"unknown hypervisor {hypervisor!r} (qemu, clh, fc, dragonball)")
    return h


def _write_json(real_path: str, obj, indent: int | None = 1) -> None:
    os.makedirs(os.path.dirname(real_path), exist_ok=True)
    tmp = real_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, real_path)


def _join(root: str, node_path: str) -> str:
    return os.path.join(root, node_path.lstrip("/"))


def _set_mtime(real_path: str, created: float | None) -> None:
    if created is not None:
        os.utime(real_path, (created, created))


def cri_annotations(sandbox_id: str, *, pod_name: str, pod_namespace: str, pod_uid: str,
                    vcpus: float = 1, memory_mib: int = 2048, cri: str = "containerd") -> dict:
    """The annotations containerd (or CRI-O) puts on a pod sandbox's OCI spec."""
    if cri == "crio":
        return {
            "io.kubernetes.cri-o.ContainerType": "sandbox",
            "io.kubernetes.cri-o.SandboxID": sandbox_id,
            "io.kubernetes.cri-o.KubeName": pod_name,
            "io.kubernetes.cri-o.Namespace": pod_namespace,
            "io.kubernetes.pod.name": pod_name,
            "io.kubernetes.pod.namespace": pod_namespace,
            "io.kubernetes.pod.uid": pod_uid,
        }
    return {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": sandbox_id,
        "io.kubernetes.cri.sandbox-name": pod_name,
        "io.kubernetes.cri.sandbox-namespace": pod_namespace,
        "io.kubernetes.cri.sandbox-uid": pod_uid,
        "io.kubernetes.cri.sandbox-log-directory": f"/var/log/pods/{pod_namespace}_{pod_name}_{pod_uid}",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-cpu-quota": str(int(vcpus * 100000)),
        "io.kubernetes.cri.sandbox-cpu-shares": str(int(vcpus * 1024)),
        "io.kubernetes.cri.sandbox-memory": str(memory_mib << 20),
    }


def write_bundle(root: str, sandbox_id: str, annotations: dict, *, cri: str = "containerd",
                 namespace: str = "k8s.io", created: float | None = None,
                 raw_config: bytes | None = None) -> str:
    """Write the sandbox's OCI bundle config.json; return the bundle's node path.

    ``raw_config`` writes those bytes verbatim (for malformed-input tests).
    """
    if cri == "crio":
        bundle = f"{CRIO_DIR}/{sandbox_id}/userdata"
    else:
        bundle = f"{CONTAINERD_TASK_DIR}/{namespace}/{sandbox_id}"
    real = _join(root, bundle)
    os.makedirs(real, exist_ok=True)
    spec = {
        "ociVersion": "1.1.0",
        "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/pause"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": annotations.get("io.kubernetes.cri.sandbox-name")
        or annotations.get("io.kubernetes.cri-o.KubeName", ""),
        "annotations": annotations,
        "linux": {"cgroupsPath": f"kubepods-besteffort-pod{sandbox_id[:12]}.slice:cri-containerd:{sandbox_id}"},
    }
    cfg = os.path.join(real, "config.json")
    if raw_config is not None:
        with open(cfg, "wb") as f:
            f.write(raw_config)
    else:
        _write_json(cfg, spec)
    _set_mtime(cfg, created)
    return bundle


def write_go_sandbox(root: str, sandbox_id: str, *, hypervisor: str = "qemu", pid: int | None = None,
                     pod_name: str | None = None, pod_namespace: str = "default",
                     pod_uid: str | None = None, memory_mib: int = 2048, vcpus: float = 1,
                     max_vcpus: int = 0, hotplugged_memory_mib: int = 0,
                     kernel: str = DEFAULT_KERNEL, initrd: str = "", image: str = DEFAULT_IMAGE,
                     hypervisor_path: str | None = None, sandbox_cgroup_only: bool = False,
                     cgroup_path: str | None = None, overhead_cgroup_path: str | None = None,
                     api_socket: str | None = None, extra_monitor_socket: bool = False,
                     enable_pprof: bool = False, virtio_mem: bool = False,
                     reclaim_guest_freed_memory: bool = False, guest_memory_dump_path: str = "",
                     state: str = "running", container_ids: tuple[str, ...] = (),
                     cri: str = "containerd", containerd_namespace: str = "k8s.io",
                     bundle: bool = True, created: float | None = None,
                     extra_annotations: dict | None = None,
                     raw_persist: bytes | None = None) -> SandboxPaths:
    """Lay out one Go-runtime sandbox (containerd-shim-kata-v2) under ``root``.

    ``api_socket`` overrides the node path of the hypervisor's control socket
    (default: ``/run/vc/vm/<id>/qmp.sock`` for QEMU, ``clh-api.sock`` for Cloud
    Hypervisor, the jailed ``firecracker.socket`` for Firecracker). As upstream,
    ``HypervisorState.APISocket`` is only filled in for Cloud Hypervisor (or
    when ``api_socket`` is given). ``raw_persist`` writes those bytes as
    persist.json instead (for corrupt-state tests).
    """
    hv = hv_key(hypervisor)
    pod_name = pod_name or f"pod-{sandbox_id[:8]}"
    pod_uid = pod_uid or str(_uuid.uuid5(_uuid.NAMESPACE_URL, "pod/" + sandbox_id))
    hv_type = GO_HYPERVISOR_TYPES[hv]
    sbs = f"{GO_SBS}/{sandbox_id}"
    vm_dir = f"{GO_VM}/{sandbox_id}"
    pid_file = None
    extra_mon = None
    if hv == "fc":
        # the jail folder is the basename of the hypervisor binary
        hv_bin = os.path.basename(hypervisor_path or DEFAULT_HYPERVISOR_PATHS["fc"]) or "firecracker"
        vm_dir = f"/run/vc/{hv_bin}/{sandbox_id[:32]}"  # as firecracker.truncateID
        default_api = f"{vm_dir}/root/run/firecracker.socket"
        pid_file = f"{vm_dir}/root/firecracker.pid"
    elif hv == "clh":
        default_api = f"{vm_dir}/clh-api.sock"
    elif hv == "qemu":
        default_api = f"{vm_dir}/qmp.sock"
        pid_file = f"{vm_dir}/pid"
        if extra_monitor_socket:
            extra_mon = f"{vm_dir}/extra-monitor.sock"
    else:  # dragonball is runtime-rs only, but keep the Go writer total
        default_api = None
    api = api_socket or default_api
    # Kata renames the sandbox's cgroup to kata_<id> in both modes (resourcecontrol.RenameCgroupPath).
    cg = cgroup_path or f"/kubepods/besteffort/pod{pod_uid}/kata_{sandbox_id}"
    overhead = "" if sandbox_cgroup_only else (overhead_cgroup_path or f"/kata_overhead/{sandbox_id}")
    uid = str(_uuid.uuid5(_uuid.NAMESPACE_URL, "vm/" + sandbox_id))
    persist = {
        "PersistVersion": 2,
        "State": state,
        "GuestMemoryBlockSizeMB": 128,
        "GuestMemoryHotplugProbe": False,
        "SandboxContainer": sandbox_id,
        "CgroupPaths": None,
        "SandboxCgroupPath": cg,
        "OverheadCgroupPath": overhead,
        "HypervisorState": {
            "BlockIndexMap": {},
            "Type": hv_type,
            "UUID": uid,
            "APISocket": api if (api_socket or hv == "clh") else "",
            "Bridges": [],
            "HotpluggedVCPUs": [],
            "HotpluggedMemory": int(hotplugged_memory_mib),
            "VirtiofsDaemonPid": 0,
            "Pid": int(pid or 0),
            "PCIeRootPort": 0,
            "PCIeSwitchPort": 0,
            "HotPlugVFIO": "no-port",
            "ColdPlugVFIO": "no-port",
            "HotplugVFIOOnRootBus": False,
        },
        "AgentState": {"URL": f"vsock://{int(_uuid.UUID(uid)) % 2**31 + 3}:1024"
                       if hv != "fc" else f"hvsock://{vm_dir}/root/kata.hvsock:1024"},
        "Network": {"NetworkID": f"/var/run/netns/cni-{uid}", "Endpoints": [], "NetworkCreated": False},
        "Devices": [],
        "Config": {
            "HypervisorType": hv_type,
            "KataAgentConfig": {"KernelModules": None, "ContainerPipeSize": 0, "DialTimeout": 45,
                                "LongLiveConn": True, "Debug": False, "Trace": False,
                                "EnableDebugConsole": False},
            "KataShimConfig": None,
            "HypervisorConfig": {
                "NumVCPUsF": float(vcpus),
                "DefaultMaxVCPUs": int(max_vcpus or os.cpu_count() or 1),
                "MemorySize": int(memory_mib),
                "DefaultBridges": 1,
                "Msize9p": 8192,
                "MemSlots": 10,
                "MemOffset": 0,
                "VirtioMem": bool(virtio_mem),
                "KernelPath": kernel,
                "ImagePath": image,
                "InitrdPath": initrd,
                "FirmwarePath": "",
                "MachineAccelerators": "",
                "CPUFeatures": "",
                "HypervisorPath": hypervisor_path if hypervisor_path is not None
                else DEFAULT_HYPERVISOR_PATHS[hv],
                "HypervisorCtlPath": "",
                "JailerPath": "/opt/kata/bin/jailer" if hv == "fc" else "",
                "BlockDeviceDriver": "virtio-scsi",
                "HypervisorMachineType": "q35" if hv == "qemu" else "",
                "MemoryPath": "",
                "DevicesStatePath": "",
                "EntropySource": "/dev/urandom",
                "SharedFS": "virtio-fs",
                "VirtioFSDaemon": "/opt/kata/libexec/virtiofsd",
                "VirtioFSCache": "auto",
                "FileBackedMemRootDir": "",
                # persistapi.HypervisorConfig has GuestMemoryDumpPaging but no GuestMemoryDumpPath,
                # ReclaimGuestFreedMemory or ExtraMonitorSocket (nor Config.EnablePprof)
                "GuestMemoryDumpPaging": False,
                "EnableDebug": False,
                "HugePages": False,
                "Realtime": False,
                "Mlock": False,
                "DisableNestingChecks": False,
                "DisableImageNvdimm": False,
                "HotplugVFIOOnRootBus": False,
                "BootToBeTemplate": False,
                "BootFromTemplate": False,
                "DisableVhostNet": False,
                "EnableVhostUserStore": False,
                "GuestSwap": False,
            },
            "SandboxBindMounts": [],
            "Experimental": [],
            "ContainerConfigs": [],
            "Cgroups": None,
            "ShmSize": 67108864,
            "SharePidNs": False,
            "SystemdCgroup": False,
            "SandboxCgroupOnly": bool(sandbox_cgroup_only),
            "DisableGuestSeccomp": True,
        },
    }
    os.makedirs(_join(root, sbs), exist_ok=True)
    os.makedirs(_join(root, vm_dir), exist_ok=True)
    if hv == "fc":
        os.makedirs(_join(root, f"{vm_dir}/root/run"), exist_ok=True)
        _write_json(_join(root, f"{vm_dir}/fcConfig.json"),
                    {"boot-source": {"kernel_image_path": kernel},
                     "machine-config": {"vcpu_count": int(vcpus), "mem_size_mib": memory_mib}})
    state_file = f"{sbs}/persist.json"
    if raw_persist is not None:
        with open(_join(root, state_file), "wb") as f:
            f.write(raw_persist)
    else:
        _write_json(_join(root, state_file), persist)
    _set_mtime(_join(root, state_file), created)
    if pid_file and pid:
        with open(_join(root, pid_file), "w") as f:
            f.write(f"{pid}")
    for cid in container_ids:
        _write_json(_join(root, f"{sbs}/{cid}/persist.json"), {
            "State": "running",  # persistapi.ContainerState.State is a string
            "CgroupPath": f"{cg}/{cid}",
            "BundlePath": f"{CONTAINERD_TASK_DIR}/{containerd_namespace}/{cid}",
            "Rootfs": {"Target": "", "Source": "", "Type": "", "Options": None},
            "Process": {"Token": "", "Pid": int(pid or 0), "StartTime": "0001-01-01T00:00:00Z"},
            "Mounts": [],
        })
    bundle_node = None
    if bundle:
        ann = cri_annotations(sandbox_id, pod_name=pod_name, pod_namespace=pod_namespace,
                              pod_uid=pod_uid, vcpus=vcpus, memory_mib=memory_mib, cri=cri)
        if enable_pprof:
            ann["io.katacontainers.config.runtime.enable_pprof"] = "true"
        ann.update(extra_annotations or {})
        bundle_node = write_bundle(root, sandbox_id, ann, cri=cri, namespace=containerd_namespace,
                                   created=created)
    return SandboxPaths(root=os.path.abspath(root), sandbox_id=sandbox_id, runtime="go",
                        state_dir_node=sbs, state_file_node=state_file,
                        shim_socket_node=f"{sbs}/{SHIM_SOCKET_NAME}", api_socket_node=api,
                        bundle_node=bundle_node, vm_dir_node=vm_dir, pid_file_node=pid_file,
                        extra_monitor_socket_node=extra_mon)


def write_rs_sandbox(root: str, sandbox_id: str, *, hypervisor: str = "dragonball",
                     pid: int | None = None, pod_name: str | None = None,
                     pod_namespace: str = "default", pod_uid: str | None = None,
                     memory_mib: int = 2048, vcpus: float = 1, max_vcpus: int = 0,
                     kernel: str = DEFAULT_KERNEL, initrd: str = "", image: str = DEFAULT_IMAGE,
                     hypervisor_path: str | None = None, guest_memory_dump_path: str = "",
                     virtio_mem: bool = False, reclaim_guest_freed_memory: bool = False,
                     jailed: bool | None = None, release: str = "3.30", cri: str = "containerd",
                     containerd_namespace: str = "k8s.io", bundle: bool = True,
                     created: float | None = None, extra_annotations: dict | None = None,
                     raw_state: bytes | None = None) -> SandboxPaths:
    """Lay out one runtime-rs sandbox as upstream writes it: ``state.json`` (+ bundle).

    The shape is runtime-rs's ``HypervisorState``
    (``src/runtime-rs/crates/hypervisor/src/hypervisor_persist.rs``) written pretty
    (2-space indent) by ``src/runtime-rs/crates/persist/src/lib.rs`` (``to_disk``), with
    ``config`` being kata-types' hypervisor config
    (``src/libs/kata-types/src/config/hypervisor/mod.rs``) whose boot/cpu/memory/device/
    debug info are ``#[serde(flatten)]``: ``kernel``, ``default_vcpus`` (f32) ... at one level.
    Every runtime-rs hypervisor's ``save()`` leaves ``pid: null`` and ``api_socket: ""``.
    Only a subset of the config's ~100 keys is written (the ones katactl reads, plus
    neighbours), with upstream's names and types.

    Where it lives, per hypervisor (each driver's ``prepare_vm``/``save``):

    - Dragonball (in the shim process): ``/run/kata/<id>/state.json``; ``vm_path`` and
      ``run_dir`` ``/run/kata/<id>``; no control socket.
    - QEMU: ``/run/kata/<id>/state.json``; ``save()`` fills only type, id and config
      (``vm_path``/``run_dir`` empty); ``qmp.sock`` is relative to the shim's cwd (the bundle).
    - Cloud Hypervisor: ``/run/kata/<id>/state.json``, API ``/run/kata/<id>/ch-api.sock``;
      ``hypervisor_type`` is ``clh`` from 3.30, ``cloud-hypervisor`` before (``release``).
    - Firecracker: jailed (the default, and the only mode recent releases restore):
      ``vm_path`` ``/run/kata/firecracker/<id>``, ``run_dir`` ``<vm_path>/root/run``, the
      API socket ``<run_dir>/fc.sock`` and state.json at ``<vm_path>/root/state.json``
      (``to_disk(.., jailer_path)``); unjailed (``jailed=False``, older releases):
      ``/run/kata/<id>/run/fc.sock`` and ``/run/kata/<id>/state.json``.

    ``pid`` is the *shim's* pid: containerd's shim v2 writes it to ``<bundle>/shim.pid``;
    runtime-rs persists no VMM pid (Dragonball's VMM is the shim itself; for the others
    the VMM is the shim's child). The shim management socket is always
    ``/run/kata/<id>/shim-monitor.sock``.
    """
    hv = hv_key(hypervisor)
    pod_name = pod_name or f"pod-{sandbox_id[:8]}"
    pod_uid = pod_uid or str(_uuid.uuid5(_uuid.NAMESPACE_URL, "pod/" + sandbox_id))
    d = f"{RS_DIR}/{sandbox_id}"
    bundle_node: str | None = (f"{CRIO_DIR}/{sandbox_id}/userdata" if cri == "crio"
                               else f"{CONTAINERD_TASK_DIR}/{containerd_namespace}/{sandbox_id}")
    jailed = (hv == "fc") if jailed is None else bool(jailed and hv == "fc")
    state_dir = d
    vm_path, run_dir, jailer_root = d, d, ""
    if hv == "qemu":
        vm_path = run_dir = ""
        api = f"{bundle_node}/qmp.sock"
    elif hv == "clh":
        api = f"{d}/ch-api.sock"
    elif hv == "fc":
        if jailed:
            jailer_root = RS_DIR
            vm_path = f"{RS_DIR}/firecracker/{sandbox_id}"
            run_dir = f"{vm_path}/root/run"
            state_dir = f"{vm_path}/root"
        else:
            run_dir = f"{d}/run"
        api = f"{run_dir}/fc.sock"
    else:
        api = None
    if hv == "clh":
        hv_type = "clh" if _release_at_least(release, (3, 30)) else "cloud-hypervisor"
    else:
        hv_type = RS_HYPERVISOR_TYPES[hv]
    uid = str(_uuid.uuid5(_uuid.NAMESPACE_URL, "vm/" + sandbox_id))
    config = {
        "path": hypervisor_path if hypervisor_path is not None else DEFAULT_HYPERVISOR_PATHS[hv],
        "valid_hypervisor_paths": [],
        "ctlpath": "",
        "jailer_path": "/opt/kata/bin/jailer" if jailed else "",
        "disable_nesting_checks": False,
        "enable_iothreads": False,
        # BlockDeviceInfo (flattened)
        "disable_block_device_use": False,
        "block_device_driver": "virtio-blk-pci",
        "block_device_aio": "io_uring",
        "memory_offset": 0,
        "enable_vhost_user_store": False,
        # BootInfo (flattened)
        "kernel": kernel,
        "kernel_params": "",
        "initrd": initrd,
        "image": image,
        "rootfs_type": "ext4",
        "firmware": "",
        "vm_rootfs_driver": "virtio-blk-pci",
        # CpuInfo (flattened)
        "cpu_features": "",
        "default_vcpus": float(vcpus),
        "default_maxvcpus": int(max_vcpus or os.cpu_count() or 1),
        # DebugInfo (flattened)
        "enable_debug": False,
        "log_level": "info",
        "guest_memory_dump_paging": False,
        "guest_memory_dump_path": guest_memory_dump_path,
        "extra_monitor_socket": "",
        # DeviceInfo (flattened)
        "default_bridges": 1,
        "hotplug_vfio_on_root_bus": False,
        "pcie_root_port": 0,
        "enable_iommu": False,
        "enable_iommu_platform": False,
        "reclaim_guest_freed_memory": bool(reclaim_guest_freed_memory),
        # MachineInfo (flattened)
        "machine_type": "q35" if hv == "qemu" else "",
        "machine_accelerators": "",
        "pflashes": [],
        "entropy_source": "/dev/urandom",
        # MemoryInfo (flattened)
        "default_memory": int(memory_mib),
        "memory_slots": 10,
        "default_maxmemory": 0,
        "enable_mem_prealloc": False,
        "enable_hugepages": False,
        "file_mem_backend": "",
        "enable_virtio_mem": bool(virtio_mem),
        "enable_guest_swap": False,
        # SharedFsInfo (flattened)
        "shared_fs": "virtio-fs",
        "virtio_fs_daemon": "/opt/kata/libexec/virtiofsd",
        "virtio_fs_cache": "auto",
        "factory": {"enable_template": False, "template_path": ""},
        "prefetch_list_path": "",
        "disable_guest_selinux": True,
        "disable_selinux": False,
    }
    state = {
        "sandbox_type": "virt_container",
        "resource": {"cgroup_state": {"path": f"/kata_{sandbox_id}", "overhead_path": f"/kata_overhead/{sandbox_id}",
                                      "sandbox_cgroup_only": False}},
        "hypervisor": {
            "hypervisor_type": hv_type,
            "pid": None,
            "uuid": "",
            "api_socket": "",
            "id": sandbox_id,
            "vm_path": vm_path,
            "jailed": jailed,
            "jailer_root": jailer_root,
            "netns": None if hv == "qemu" else f"/var/run/netns/cni-{uid}",
            "config": config,
            "run_dir": run_dir,
            "cached_block_devices": [],
            "virtiofs_daemon_pid": 0,
            "passfd_listener_port": None,
            "guest_protection_to_use": "NoProtection",
        },
    }
    os.makedirs(_join(root, d), exist_ok=True)   # the shim's dir: shim-monitor.sock lives here
    os.makedirs(_join(root, state_dir), exist_ok=True)
    if run_dir:
        os.makedirs(_join(root, run_dir), exist_ok=True)
    state_file = f"{state_dir}/state.json"
    if raw_state is not None:
        with open(_join(root, state_file), "wb") as f:
            f.write(raw_state)
    else:
        _write_json(_join(root, state_file), state, indent=2)
    _set_mtime(_join(root, state_file), created)
    if bundle:
        ann = cri_annotations(sandbox_id, pod_name=pod_name, pod_namespace=pod_namespace,
                              pod_uid=pod_uid, vcpus=vcpus, memory_mib=memory_mib, cri=cri)
        ann.update(extra_annotations or {})
        bundle_node = write_bundle(root, sandbox_id, ann, cri=cri, namespace=containerd_namespace,
                                   created=created)
        if pid:
            write_shim_pid(root, bundle_node, pid)
    else:
        bundle_node = None
    return SandboxPaths(root=os.path.abspath(root), sandbox_id=sandbox_id, runtime="rs",
                        state_dir_node=state_dir, state_file_node=state_file,
                        shim_socket_node=f"{d}/{SHIM_SOCKET_NAME}", api_socket_node=api,
                        bundle_node=bundle_node, vm_dir_node=vm_path or d)


def write_shim_pid(root: str, bundle_node: str, pid: int) -> None:
    """``<bundle>/shim.pid``: the shim's pid, as containerd's shim v2 start writes it
    (plain decimal, no newline)."""
    with open(_join(root, f"{bundle_node}/shim.pid"), "w") as f:
        f.write(str(int(pid)))


def _release_at_least(release: str, want: tuple[int, int]) -> bool:
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= want


DIRECT_VOLUMES = "/run/kata-containers/shared/direct-volumes"


def write_direct_volume(root: str, volume_path: str, *, sandbox_id: str | None = None,
                        device: str = "/dev/vdb", fstype: str = "ext4") -> str:
    """Register a direct-assigned volume as ``kata-runtime direct-volume add`` does:
    ``DIRECT_VOLUMES/<base64url(volume_path)>/mountInfo.json`` (volume.MountInfo), plus
    the ``<sandbox-id>`` file the runtime adds once a sandbox uses it. Returns the
    directory's node path."""
    import base64

    d = f"{DIRECT_VOLUMES}/{base64.urlsafe_b64encode(volume_path.encode()).decode()}"
    _write_json(_join(root, f"{d}/mountInfo.json"),
                {"volume-type": "block", "device": device, "fstype": fstype, "metadata": {}, "options": []})
    if sandbox_id:
        with open(_join(root, f"{d}/{sandbox_id}"), "w"):
            pass
    return d


#: the host's kernel views a lab links into its root, so that every command that reads
#: processes, cgroups or resctrl through --host-root sees this machine's (as on a node
#: whose root is mounted at /host with /proc and /sys mounted inside)
HOST_VIEWS = ("/proc", "/sys/fs/cgroup", "/sys/fs/resctrl")


def link_host_views(root: str) -> list[str]:
    """Symlink the host's ``/proc``, ``/sys/fs/cgroup`` and, when mounted,
    ``/sys/fs/resctrl`` into ``root``; return the node paths linked.

    Whoever removes ``root`` must not follow these links (see
    :func:`unlink_host_views`, and :func:`katactl.lab.daemon.remove_tree`)."""
    made = []
    for p in HOST_VIEWS:
        if not os.path.isdir(p) or (p == "/sys/fs/resctrl" and not os.path.ismount(p)):
            continue  # /sys/fs/resctrl exists (empty) on kernels with RDT until mounted
        link = _join(root, p)
        if os.path.islink(link) and os.readlink(link) == p:
            made.append(p)
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(p, link)
        made.append(p)
    return made


def unlink_host_views(root: str) -> None:
    """Remove the links :func:`link_host_views` made (the links, never what they point to)."""
    for p in HOST_VIEWS:
        link = _join(root, p)
        if os.path.islink(link):
            os.unlink(link)


def sandbox_id_for(n: int, prefix: str = "") -> str:
    """A deterministic 64-hex sandbox id (containerd style)."""
    import hashlib

    return hashlib.sha256(f"{prefix}sandbox-{n}".encode()).hexdigest()


def write_many(root: str, count: int, *, runtime: str = "go", hypervisor: str = "qemu",
               pid: int | None = None, created: float | None = None, **kw) -> list[SandboxPaths]:
    """``count`` sandboxes (for benches and lab scale tests)."""
    writer = write_go_sandbox if runtime == "go" else write_rs_sandbox
    created = created if created is not None else time.time() - 3600
    return [writer(root, sandbox_id_for(i), hypervisor=hypervisor, pid=pid,
                   pod_name=f"batch-{i}", pod_namespace="batch", created=created, **kw)
            for i in range(count)]


# -- kata-deploy's configuration layout and containerd's runtime handlers ----------
#: kata-deploy's shims that run runtime-rs (kata-deploy binary src/utils: is_rust_shim)
RUST_SHIMS = ("cloud-hypervisor", "dragonball", "qemu-runtime-rs", "qemu-coco-dev-runtime-rs",
              "qemu-se-runtime-rs")
#: the CRI plugin holding containerd.runtimes, per containerd config version
CONTAINERD_CRI_PLUGINS = {3: "io.containerd.cri.v1.runtime", 2: "io.containerd.grpc.v1.cri"}


@dataclasses.dataclass
class KataDeployHandler:
    """One runtime handler kata-deploy configured (node paths)."""

    name: str            # kata-<shim>: the RuntimeClass handler
    shim: str
    runtime: str         # "go" | "rs"
    runtime_path: str    # the shim binary containerd starts (runtime_path)
    config_path: str     # options.ConfigPath: the per-shim copy
    config_dir: str      # its directory (config.d lives here)
    pristine: str        # the installed original the copy was made from


def write_kata_deploy(root: str, shims: dict[str, str], *, dropins: dict[str, dict[str, str]] | None = None,
                      dest_dir: str = "/opt/kata", containerd_version: int = 3,
                      containerd_config: str = "/etc/containerd/config.toml") -> dict[str, KataDeployHandler]:
    """Lay out what kata-deploy installs for ``shims`` ({shim: configuration TOML}), as its
    ``tools/packaging/kata-deploy/binary`` does: the installed
    ``<dest>/share/defaults/kata-containers[/runtime-rs]/configuration-<shim>.toml``, the
    per-shim copy containerd points at, ``.../runtimes/<shim>/configuration-<shim>.toml``
    with its own ``config.d/`` (``dropins[shim]``: {file name: TOML};
    ``artifacts/install.rs`` setup_runtime_directory copies rather than links so that this
    config.d applies), the shim binaries (``<dest>/bin/containerd-shim-kata-v2``, runtime-rs
    ``<dest>/runtime-rs/bin/...``; placeholders), and containerd's side
    (``runtime/containerd.rs``): ``<dest>/containerd/config.d/kata-deploy.toml`` with one
    ``[plugins.<cri>.containerd.runtimes.kata-<shim>]`` table per shim (runtime_type
    ``io.containerd.kata-<shim>.v2``, runtime_path, privileged_without_host_devices,
    pod_annotations, options.ConfigPath), named in ``imports`` of containerd's main config
    (``version = containerd_version``: 3 for containerd 2.x, 2 for 1.x).
    Returns {handler: KataDeployHandler}."""
    plugin = CONTAINERD_CRI_PLUGINS[containerd_version]
    dropin_file = f"{dest_dir}/containerd/config.d/kata-deploy.toml"
    out: dict[str, KataDeployHandler] = {}
    tables = []
    for shim, text in shims.items():
        rs = shim in RUST_SHIMS
        base = f"{dest_dir}/share/defaults/kata-containers" + ("/runtime-rs" if rs else "")
        h = KataDeployHandler(
            name=f"kata-{shim}", shim=shim, runtime="rs" if rs else "go",
            runtime_path=f"{dest_dir}/runtime-rs/bin/containerd-shim-kata-v2" if rs
            else f"{dest_dir}/bin/containerd-shim-kata-v2",
            config_path=f"{base}/runtimes/{shim}/configuration-{shim}.toml",
            config_dir=f"{base}/runtimes/{shim}", pristine=f"{base}/configuration-{shim}.toml")
        for p in (h.pristine, h.config_path):
            _write_text(_join(root, p), text)
        os.makedirs(_join(root, f"{h.config_dir}/config.d"), exist_ok=True)
        for name, body in sorted((dropins or {}).get(shim, {}).items()):
            _write_text(_join(root, f"{h.config_dir}/config.d/{name}"), body)
        binary = _join(root, h.runtime_path)
        if not os.path.exists(binary):
            _write_text(binary, "#!/bin/sh\n")
            os.chmod(binary, 0o755)
        t = f'[plugins."{plugin}".containerd.runtimes.{h.name}]'
        tables.append(f'{t}\nruntime_type = "io.containerd.{h.name}.v2"\n'
                      f"runtime_path = {json.dumps(h.runtime_path)}\n"
                      'privileged_without_host_devices = true\npod_annotations = ["io.katacontainers.*"]\n\n'
                      f"{t[:-1]}.options]\nConfigPath = {json.dumps(h.config_path)}\n")
        out[h.name] = h
    _write_text(_join(root, dropin_file), "\n".join(tables))
    _write_text(_join(root, containerd_config), (
        f"version = {containerd_version}\nimports = [{json.dumps(dropin_file)}]\n\n"
        f'[plugins."{plugin}".containerd.runtimes.runc]\nruntime_type = "io.containerd.runc.v2"\n'))
    return out


def write_shim_binary_path(root: str, bundle_node: str, binary: str) -> None:
    """``<bundle>/shim-binary-path``: the shim binary containerd (>= 1.6) started for the
    sandbox, as ``runtime/v2/binary.go`` Start writes it (the runtime_path, or the
    ``containerd-shim-<name>-<version>`` it looked up; no newline)."""
    _write_text(_join(root, f"{bundle_node}/shim-binary-path"), binary)


def _write_text(real_path: str, text: str) -> None:
    os.makedirs(os.path.dirname(real_path), exist_ok=True)
    with open(real_path, "w", encoding="utf-8") as f:
        f.write(text)
