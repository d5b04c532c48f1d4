"""Sandbox discovery, pod mapping, liveness and target resolution (issue 3)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from katactl import sandbox
from katactl.backends.local import LocalTransport
from katactl.errors import Ambiguous, NotFound, UsageError
from katactl.lab import layout
from tests._katanode import node


@pytest.fixture(scope="module")
def tree():
    """A node with Go (qemu, clh, fc), runtime-rs (dragonball, clh, qemu), CRI-O, a dead PID,
    a corrupt persist.json and a socket nobody listens on."""
    with node() as n:
        n.go("aaa111", pod_name="web", pod_namespace="prod", memory_mib=4096, vcpus=2,
             hotplugged_memory_mib=1024, sandbox_cgroup_only=True, extra_monitor_socket=True)
        n.go("aab222", hypervisor="clh", pod_name="api", pod_namespace="prod")
        n.go("fc3333", hypervisor="fc", pod_name="fn", pod_namespace="faas")
        n.rs("rs4444", hypervisor="dragonball", pod_name="batch-0", pod_namespace="batch")
        n.rs("rs5555", hypervisor="clh", pod_name="batch-1", pod_namespace="batch")
        n.rs("rs6666", hypervisor="qemu", pod_name="batch-2", pod_namespace="batch")
        n.go("cr7777", cri="crio", pod_name="crio-pod", pod_namespace="other")
        n.go("dead88", serve=False, pid=2 ** 22 + 7, pod_name="gone", pod_namespace="prod")
        n.go("bad999", serve=False, raw_persist=b'{"PersistVersion": 2, "State": "runn',
             pod_name="broken", pod_namespace="prod")
        p = n.go("deaf00", serve=False, pod_name="deaf", pod_namespace="prod")
        # a socket file with nobody listening (a crashed shim leaves exactly this)
        s = socket.socket(socket.AF_UNIX)
        s.bind(p.shim_socket)
        s.close()
        # the extra monitor socket exists for aaa111
        open(n.paths["aaa111"].extra_monitor_socket, "w").close()
        yield n


def by_id(items):
    return {i["id"]: i for i in items}


def test_discover_fields_go_and_rs(tree):
    sbs = {s.id: s for s in sandbox.discover(LocalTransport(tree.root))}
    a = sbs["aaa111"]
    assert (a.runtime, a.hypervisor, a.hypervisor_pid) == ("go", "qemu", os.getpid())
    assert (a.memory_mib, a.hotplugged_memory_mib, a.total_memory_mib, a.vcpus) == (4096, 1024, 5120, 2.0)
    assert a.sandbox_cgroup_only is True and a.overhead_cgroup_path is None
    assert a.api_socket == "/run/vc/vm/aaa111/qmp.sock"
    assert a.extra_monitor_socket == "/run/vc/vm/aaa111/extra-monitor.sock"
    assert a.shim_socket == "/run/vc/sbs/aaa111/shim-monitor.sock"
    assert a.kernel == layout.DEFAULT_KERNEL and a.image == layout.DEFAULT_IMAGE
    assert a.pod == {"name": "web", "namespace": "prod", "uid": a.pod["uid"]} and a.pod["uid"]
    assert a.state == "running" and a.cri == "containerd"
    assert sbs["aab222"].api_socket == "/run/vc/vm/aab222/clh-api.sock"
    assert sbs["fc3333"].hypervisor == "fc"
    assert sbs["fc3333"].api_socket == "/run/vc/firecracker/fc3333/root/run/firecracker.socket"
    assert sbs["rs4444"].runtime == "rs" and sbs["rs4444"].hypervisor == "dragonball"
    assert sbs["rs4444"].api_socket is None
    assert sbs["rs5555"].api_socket == "/run/kata/rs5555/ch-api.sock"
    assert sbs["rs6666"].api_socket == \
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/rs6666/qmp.sock"
    assert sbs["cr7777"].cri == "crio" and sbs["cr7777"].pod["name"] == "crio-pod"


def test_states_and_reasons(tree):
    sbs = {s.id: s for s in sandbox.discover(LocalTransport(tree.root))}
    assert sbs["dead88"].state == "stale" and "not running" in sbs["dead88"].reason
    assert sbs["deaf00"].state == "stale" and "nobody is listening" in sbs["deaf00"].reason
    assert sbs["bad999"].state == "unknown" and "not valid JSON" in sbs["bad999"].reason
    # the broken one still has its pod
    assert sbs["bad999"].pod["name"] == "broken"
    running = {i for i, s in sbs.items() if s.state == "running"}
    assert running == {"aaa111", "aab222", "fc3333", "rs4444", "rs5555", "rs6666", "cr7777"}


def test_a_shim_whose_accept_backlog_is_full_is_unknown_not_stale():
    """Stale is decided on connect_unix's reason (missing, refused), never on its wording: a
    shim that is alive but accepts nothing right now (its listen backlog full: connect() says
    EAGAIN) cannot be told apart from a slow one, so the sandbox is unknown, with why."""
    with node() as n:
        p = n.go("busy01", serve=False, pod_name="busy", pod_namespace="prod")
        n.go("deaf02", serve=False, pod_name="deaf", pod_namespace="prod")
        s = socket.socket(socket.AF_UNIX)
        s.bind(n.paths["deaf02"].shim_socket)
        s.close()  # the file stays, nobody listens: refused
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(p.shim_socket)
        srv.listen(0)
        held = socket.socket(socket.AF_UNIX)
        held.connect(p.shim_socket)  # never accepted: the backlog (0) is full
        try:
            sbs = {x.id: x for x in sandbox.discover(LocalTransport(n.root))}
        finally:
            held.close()
            srv.close()
    assert sbs["busy01"].state == "unknown"
    assert sbs["busy01"].reason.startswith("shim socket not checked: /run/vc/sbs/busy01/shim-monitor.sock: ")
    assert (sbs["deaf02"].state, sbs["deaf02"].reason) == ("stale", "nobody is listening on the shim socket")


def test_a_listed_sandbox_keeps_its_annotations_not_the_whole_bundle_spec():
    """A real bundle config.json is mostly mounts, namespaces and a seccomp profile (5-20 KiB);
    what a listed sandbox keeps of it is its annotations (parsed when first asked for), so
    memory per sandbox does not grow with the spec. tracemalloc counts bytes, not time."""
    seccomp = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": [f"syscall_{i:04d}"], "action": "SCMP_ACT_ALLOW"} for i in range(400)]}
    with node() as n:
        for i in range(40):
            p = n.go(f"spec{i:03d}", serve=False, pod_name=f"p{i}", pod_namespace="ns")
            spec_file = p.real(f"{p.bundle_node}/config.json")
            with open(spec_file) as f:
                spec = json.load(f)
            spec.setdefault("linux", {})["seccomp"] = seccomp
            with open(spec_file, "w") as f:
                json.dump(spec, f, indent=1)
            assert os.path.getsize(spec_file) > 20 << 10
        # counted in a process of its own: tracemalloc counts every thread's allocations,
        # and in the full suite the session's servers (sshd relays, the kube stand-in, the
        # lab's shims) allocate concurrently in this one
        probe = (
            "import json, sys, tracemalloc\n"
            "from katactl import sandbox\n"
            "from katactl.backends.local import LocalTransport\n"
            "t = LocalTransport(sys.argv[1])\n"
            "sandbox.discover(t, check=False)  # imports and caches made once, before counting\n"
            "tracemalloc.start()\n"
            "sbs = sandbox.discover(t, check=False)\n"
            "kept = tracemalloc.get_traced_memory()[0]\n"
            "tracemalloc.stop()\n"
            "print(json.dumps({'n': len(sbs), 'kept': kept, 'ann': sbs[0].annotations, 'pod': sbs[0].pod}))\n")
        r = subprocess.run([sys.executable, "-c", probe, n.root], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    assert out["n"] == 40
    assert out["kept"] / out["n"] < 8 << 10, f"{out['kept'] / out['n']:.0f} bytes kept per sandbox"
    ann = out["ann"]
    assert ann["io.kubernetes.cri.sandbox-name"] == out["pod"]["name"] and "linux" not in ann


def test_discover_filters_by_state_and_namespace(tree):
    t = LocalTransport(tree.root)
    assert [s.id for s in sandbox.discover(t, state="stale")] == ["deaf00", "dead88"]  # by pod: deaf, gone
    assert [s.id for s in sandbox.discover(t, namespace="batch")] == ["rs4444", "rs5555", "rs6666"]
    assert [s.id for s in sandbox.discover(t, state="unknown", namespace="prod")] == ["bad999"]
    assert sandbox.discover(t, state="stale", namespace="batch") == []
    for bad in ("runing", "", "RUNNING"):
        with pytest.raises(UsageError, match="--state"):
            sandbox.discover(t, state=bad)


def test_list_json_shape(cli, tree):
    r = cli(["--host-root", tree.root, "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["apiVersion"] == "katactl/v1" and d["kind"] == "SandboxList"
    items = by_id(d["items"])
    assert len(items) == 10
    a = items["aaa111"]
    for key in ("id", "runtime", "state", "reason", "pod", "hypervisor", "hypervisorPid", "vcpus",
                "memoryMiB", "hotpluggedMemoryMiB", "kernel", "image", "initrd", "cgroup", "sockets",
                "created", "age", "bundle", "node"):
        assert key in a, key
    assert a["sockets"]["api"] == "/run/vc/vm/aaa111/qmp.sock"
    assert a["node"] == "localhost"
    assert a["pprofEnabled"] is None  # no configuration file on this node: unknown


@pytest.mark.parametrize("fmt", ["plain", "wide", "yaml", "name"])
def test_list_formats(cli, tree, fmt):
    r = cli(["--host-root", tree.root, "sandbox", "list", "-o", fmt])
    assert r.exit_code == 0, r.stderr
    if fmt == "name":
        assert sorted(r.stdout.split()) == sorted(tree.paths)
    elif fmt == "yaml":
        assert "kind: SandboxList" in r.stdout
    else:
        lines = r.stdout.splitlines()
        assert lines[0].split()[:3] == ["ID", "POD", "STATE"]
        assert len(lines) == 11
        if fmt == "wide":
            assert "REASON" in lines[0] and "not valid JSON" in r.stdout


def test_list_filters(cli, tree):
    r = cli(["--host-root", tree.root, "sandbox", "list", "--state", "stale", "-o", "name"])
    assert sorted(r.stdout.split()) == ["dead88", "deaf00"]
    r = cli(["--host-root", tree.root, "-n", "batch", "sandbox", "list", "-o", "name"])
    assert sorted(r.stdout.split()) == ["rs4444", "rs5555", "rs6666"]


@pytest.mark.parametrize("bad", ["runing", "", "RUNNING"])
def test_list_bad_state(cli, tree, bad):
    r = cli(["--host-root", tree.root, "sandbox", "list", "--state", bad])
    assert r.exit_code == 2 and "--state" in r.stderr and "Traceback" not in r.stderr


def test_inspect_resolution(cli, tree):
    for ref in ("aaa111", "aaa", "prod/web", "pod/prod/web"[4:]):
        r = cli(["--host-root", tree.root, "sandbox", "inspect", ref, "-o", "json"])
        assert r.exit_code == 0, (ref, r.stderr)
        assert r.json()["id"] == "aaa111" and r.json()["kind"] == "Sandbox"
    r = cli(["--host-root", tree.root, "sandbox", "inspect", "aaa", "--raw", "-o", "json"])
    assert r.json()["stateFileContent"]["HypervisorState"]["Type"] == "qemu"


def test_ambiguous_prefix_lists_candidates(cli, tree):
    r = cli(["--host-root", tree.root, "sandbox", "inspect", "aa", "-o", "json"])
    assert r.exit_code == 3
    err = r.json()
    assert err["kind"] == "Error" and err["code"] == "Ambiguous"
    assert err["details"]["candidates"] == ["aaa111", "aab222"]
    r = cli(["--host-root", tree.root, "sandbox", "inspect", "aa"])
    assert r.exit_code == 3 and "aaa111" in r.stderr and "aab222" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # one line + hint


@pytest.mark.parametrize("ref", ["zzz", "prod/nosuchpod", "ab"])
def test_not_found(cli, tree, ref):
    r = cli(["--host-root", tree.root, "sandbox", "inspect", ref])
    assert r.exit_code == 3, r.stderr
    assert "no sandbox" in r.stderr


@pytest.mark.parametrize("ref", ["a/b/c", "../etc", "..", "aaa\x00", "/run/vc", "a b", "Prod/Web",
                                 "prod/", "/web", "aaa/..", "x" * 300, "ns/" + "p" * 300, "a\nb", "é"])
def test_bad_refs_corpus(cli, tree, ref):
    r = cli(["--host-root", tree.root, "sandbox", "inspect", ref])
    assert r.exit_code == 2, (ref, r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") <= 2


@pytest.mark.parametrize("ref", ["../x", "a/b/c", "x\0y", ""])
def test_resolve_library_usage_errors(tree, ref):
    with pytest.raises(UsageError):
        sandbox.resolve(LocalTransport(tree.root), ref)


def test_resolve_library(tree):
    t = LocalTransport(tree.root)
    assert sandbox.resolve(t, "rs44").id == "rs4444"
    assert sandbox.resolve(t, "batch/batch-1").id == "rs5555"
    with pytest.raises(Ambiguous) as e:
        sandbox.resolve(t, "rs")
    assert e.value.details["candidates"] == ["rs4444", "rs5555", "rs6666"]
    with pytest.raises(NotFound):
        sandbox.resolve(t, "nope")


CORRUPT = [b"", b"   \n", b"{", b'{"PersistVersion": 2, "HypervisorState": {"Pid": 12', b"not json",
           b"[1, 2, 3]", b"\xff\xfe\x00garbage", b'"a string"', b"null",
           b'{"HypervisorState": "oops", "Config": []}',
           # numbers no int holds (json reads 1e400 as inf, NaN as nan): int() raised OverflowError
           b'{"PersistVersion": 2, "HypervisorState": {"Pid": 1e400, "HotpluggedMemory": -1e400},'
           b' "HypervisorConfig": {"MemorySize": NaN, "DefaultMaxVCPUs": Infinity}}']


@pytest.mark.parametrize("raw", CORRUPT)
def test_corrupt_state_files_listed_unknown(cli, tmp_path, raw):
    root = str(tmp_path)
    layout.write_go_sandbox(root, "good01", pid=None, pod_name="ok", pod_namespace="x")
    layout.write_go_sandbox(root, "bad001", raw_persist=raw)
    layout.write_rs_sandbox(root, "bad002", raw_state=raw)
    r = cli(["--host-root", root, "sandbox", "list", "-o", "json", "--no-check"])
    assert r.exit_code == 0, r.stderr
    items = by_id(r.json()["items"])
    assert set(items) == {"good01", "bad001", "bad002"}
    if raw.strip().startswith(b"{") and raw.strip().endswith(b"}"):
        # parseable object with wrong types: read what can be read, never crash
        assert items["bad001"]["state"] in ("unknown", "stale")
        assert "cannot convert" not in (items["bad001"].get("reason") or "")  # one field, not the sandbox
    else:
        assert items["bad001"]["state"] == "unknown" and items["bad001"]["reason"]
        assert items["bad002"]["state"] == "unknown" and items["bad002"]["reason"]


#: documents where a fast JSON parser could read other values than json.loads of the text
#: decoded with errors replaced, or fail with other words: integers beyond 64 bits (orjson
#: makes floats of them), NaN/Infinity/1e400, lone surrogate escapes, invalid UTF-8, a BOM,
#: nesting past orjson's limit, duplicate keys, floats that need correct rounding
JSON_EDGES = [b'{"x": 18446744073709551616}', b'{"x": -9223372036854775809}', b'{"Pid": 123456789012345678901234}',
              b'{"x": 18446744073709551615, "y": -9223372036854775808}', b'{"x": NaN, "y": Infinity, "z": -Infinity}',
              b'{"x": 1e400}', b'{"x": "\\ud800"}', b'{"x": "\\udc00\\ud800 \\ud83d\\ude00"}', b'{"x": "caf\xe9"}',
              b'{"x": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"x": 1}', b'{"a": 1, "a": 2, "b": 3}',
              b'{"x": 0.30000000000000004, "y": 9007199254740993.0, "z": 2.5e-324, "w": -0.0}',
              b'{"x": [' * 1100 + b']}' * 1100, b'{"x": "a\x01b"}', b'{"x": 01}', b'{"x": 1}{', b'{"x": tru}']


@pytest.mark.parametrize("raw", JSON_EDGES)
def test_state_files_read_as_json_reads_them(raw):
    """_loads gives what json.loads gave (values and their types), or fails with json's message."""
    def parse(f):
        try:
            return "ok", repr(f())
        except (ValueError, RecursionError) as e:
            return "error", str(e)

    want = parse(lambda: json.loads(raw.decode("utf-8", errors="replace")))
    if want[1].startswith("maximum recursion depth"):
        want = ("error", "nested too deeply")
    assert parse(lambda: sandbox._loads(raw)) == want


@pytest.mark.parametrize("ann", [{"a": "b", "caf\u00e9": "\u2028 \U0001d11e"}, {"lone": "\ud800"}, {"\udc00": "key"},
                                 {"n": float("nan"), "i": float("inf")}, {"big": 2 ** 70, "small": 1e-05},
                                 {"nested": [1, {"b": None, "t": True}]}, {}])
def test_kept_annotations_parse_back_to_the_same_dict(ann):
    """The bytes a sandbox keeps for its annotations (orjson for a map of strings, json for
    anything else or what orjson refuses) parse back to the same dict (what they cost in
    memory: test_a_listed_sandbox_keeps_its_annotations_not_the_whole_bundle_spec)."""
    assert repr(sandbox._loads(sandbox._compact(ann))) == repr(ann)


def test_non_utf8_annotations(cli, tmp_path):
    root = str(tmp_path)
    layout.write_go_sandbox(root, "utf8ok", pid=None)
    p = layout.write_go_sandbox(root, "latin1", pid=None, bundle=False)
    ann = json.dumps({"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                                      "io.kubernetes.cri.sandbox-name": "caf\u00e9-POD",
                                      "io.kubernetes.cri.sandbox-namespace": "ns"}}).encode()
    ann = ann.replace(b"caf\\u00e9", b"caf\xe9")  # raw latin-1 byte: invalid UTF-8
    layout.write_bundle(root, "latin1", {}, raw_config=ann)
    r = cli(["--host-root", root, "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    items = by_id(r.json()["items"])
    assert items["latin1"]["pod"]["name"] == "caf\ufffd-POD"
    assert items["latin1"]["pod"]["namespace"] == "ns"
    r = cli(["--host-root", root, "sandbox", "list"])
    assert r.exit_code == 0 and "ns/caf" in r.stdout
    assert p.sandbox_id == "latin1"


def test_bundle_garbage_does_not_hide_sandbox(cli, tmp_path):
    root = str(tmp_path)
    layout.write_go_sandbox(root, "nobndl", pid=None, bundle=False)
    layout.write_go_sandbox(root, "junkbd", pid=None, bundle=False)
    layout.write_bundle(root, "junkbd", {}, raw_config=b"\x00\x01{{{")
    r = cli(["--host-root", root, "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0
    items = by_id(r.json()["items"])
    assert items["nobndl"]["pod"] is None and items["junkbd"]["pod"] is None


@pytest.mark.parametrize("setup", ["nothing", "empty-dirs", "stray-files"])
def test_empty_node(cli, tmp_path, setup):
    root = str(tmp_path)
    if setup != "nothing":
        os.makedirs(f"{root}/run/vc/sbs")
        os.makedirs(f"{root}/run/kata")
    if setup == "stray-files":
        open(f"{root}/run/vc/sbs/README", "w").close()   # a file, not a sandbox dir
        os.makedirs(f"{root}/run/vc/sbs/..hidden")
    r = cli(["--host-root", root, "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0 and r.json()["items"] == []
    r = cli(["--host-root", root, "sandbox", "list"])
    assert r.exit_code == 0 and r.stdout == "" and "No sandboxs" not in r.stdout


def test_list_subprocess_real_binary(katactl_bin, tree):
    r = katactl_bin(["--host-root", tree.root, "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["items"]) == 10


def test_help_has_examples(cli):
    r = cli(["sandbox", "list", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.stdout and "katactl sandbox list -o wide" in r.stdout


def test_firecracker_socket_uses_the_runtimes_truncated_id(tmp_path):
    """Go's firecracker.truncateID keeps 32 chars of the id in the jail path (sun_path limit)."""
    sid = "f" * 64
    layout.write_go_sandbox(str(tmp_path), sid, hypervisor="fc", pod_name="fc-pod")
    [sb] = sandbox.discover(LocalTransport(str(tmp_path)), check=False)
    assert sb.api_socket == f"/run/vc/firecracker/{'f' * 32}/root/run/firecracker.socket"
    assert os.path.isdir(tmp_path / "run/vc/firecracker" / ("f" * 32) / "root/run")


def test_no_match_while_another_node_is_unreachable_is_incomplete_not_not_found(cli, tmp_path):
    """Nothing matched on the nodes that answered, but one could not be asked: the sandbox
    may be there, so not 'not found' (3, what a script reads as 'it does not exist') but
    exit 4, naming the node not searched."""
    layout.write_many(str(tmp_path), 1)
    args = ["--host-root", str(tmp_path), "-N", "localhost,127.0.0.1:1", "sandbox", "inspect"]
    r = cli(args + ["ffffffff", "-o", "json"])
    assert r.exit_code == 4, (r.exit_code, r.stdout, r.stderr)
    err = r.json()
    assert err["code"] == "Incomplete" and list(err["details"]["notSearched"]) == ["127.0.0.1:1"]
    r = cli(["--host-root", str(tmp_path), "-N", "localhost", "sandbox", "inspect", "ffffffff"])
    assert r.exit_code == 3  # every node searched: not found


def test_prefix_found_while_another_node_is_unreachable_is_refused(cli, tmp_path, caplog):
    """A node that could not be asked may hold another match for a prefix or a pod: acting
    on the one match found could hit a sandbox the user never singled out, so it is refused
    (exit 5) naming the match and the node not searched; a full id is unique and goes ahead."""
    layout.write_many(str(tmp_path), 1)
    sid = cli(["--host-root", str(tmp_path), "sandbox", "list", "-o", "json", "--no-check"]).json()["items"][0]["id"]
    args = ["--host-root", str(tmp_path), "-N", "localhost,127.0.0.1:1", "sandbox", "inspect"]
    r = cli(args + [sid[:8], "-o", "json"])
    assert r.exit_code == 5, (r.exit_code, r.stdout, r.stderr)
    err = r.json()
    assert err["code"] == "Refused" and err["details"]["match"] == {"node": "localhost", "id": sid}
    assert list(err["details"]["notSearched"]) == ["127.0.0.1:1"]
    r = cli(args + [sid[:8]])
    assert r.exit_code == 5 and len(r.stderr.strip().splitlines()) == 2, r.stderr  # one line + hint
    assert f"localhost:{sid[:12]}" in r.stderr and "127.0.0.1:1" in r.stderr and "full sandbox id" in r.stderr
    caplog.clear()
    r = cli(args + [sid, "-o", "json"])  # a full id cannot be ambiguous
    assert r.exit_code == 0 and r.json()["id"] == sid and not caplog.messages
    r = cli(["--host-root", str(tmp_path), "-N", "localhost", "sandbox", "inspect", sid[:8], "-o", "json"])
    assert r.exit_code == 0 and r.json()["id"] == sid  # naming the node alone


# -- issue 16 finding 8: one bad entry never breaks or hangs the list ------------------
def _hostile_entries(root: str) -> None:
    """A good sandbox next to every kind of bad entry (each found to break or hang
    ``sandbox list`` before): a symlink loop as a sandbox dir, a persist.json nested
    deeper than Python's recursion limit, FIFOs as persist.json / state.json / the
    bundle's config.json, and a persist.json that is a symlink loop."""
    layout.write_go_sandbox(root, "good01", pid=None, pod_name="ok", pod_namespace="x")
    os.symlink("loop01", f"{root}/run/vc/sbs/loop01")              # points at itself
    layout.write_go_sandbox(root, "deep01", raw_persist=b'{"State": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    p = layout.write_go_sandbox(root, "fifo01")
    os.unlink(p.state_file)
    os.mkfifo(p.state_file)
    p = layout.write_rs_sandbox(root, "fifo02")
    os.unlink(p.state_file)
    os.mkfifo(p.state_file)
    p = layout.write_go_sandbox(root, "fifo03", pod_name="fifo-bundle")
    os.unlink(f"{p.bundle}/config.json")
    os.mkfifo(f"{p.bundle}/config.json")
    p = layout.write_go_sandbox(root, "lnloop")
    os.unlink(p.state_file)
    os.symlink("persist.json", p.state_file)


def _check_hostile(items: dict, ssh: bool = False) -> None:
    assert set(items) == {"good01", "loop01", "deep01", "fifo01", "fifo02", "fifo03", "lnloop"}
    assert items["good01"]["pod"]["name"] == "ok"
    assert items["loop01"]["state"] == "unknown" and "symlink" in items["loop01"]["reason"]
    assert items["deep01"]["state"] == "unknown" and "nested too deeply" in items["deep01"]["reason"]
    for sid, name in (("fifo01", "persist.json"), ("fifo02", "state.json")):
        assert items[sid]["state"] == "unknown", items[sid]
        assert f"{name} is not a regular file (a FIFO)" in items[sid]["reason"]
    # a bad bundle loses the pod mapping only: the state file still decides the state
    assert items["fifo03"]["pod"] is None and items["fifo03"]["hypervisor"] == "qemu"
    # sftp-server answers ELOOP as SSH_FX_NO_SUCH_FILE; the SSH transport tells it apart,
    # so a looping file reads the same over SSH as locally
    assert items["lnloop"]["state"] == "unknown"
    assert "Too many levels of symbolic links" in items["lnloop"]["reason"]


def test_hostile_entries_listed_unknown_never_hang(cli, tmp_path):
    root = str(tmp_path)
    _hostile_entries(root)
    for extra in ([], ["--no-check"]):
        r = cli(["--host-root", root, "sandbox", "list", "-o", "json", *extra])
        assert r.exit_code == 0, r.stderr
        _check_hostile(by_id(r.json()["items"]))
    assert "fifo03" in r.stderr and "not a regular file" in r.stderr  # the lost pod mapping is said
    # resolving one of them works as well (the quick bundle path included)
    r = cli(["--host-root", root, "sandbox", "inspect", "fifo01", "-o", "json"])
    assert r.exit_code == 0 and r.json()["state"] == "unknown"
    r = cli(["--host-root", root, "sandbox", "inspect", "fifo03", "-o", "json"])
    assert r.exit_code == 0 and r.json()["pod"] is None


def test_hostile_entries_over_ssh(cli, sshd_lab, tmp_path):
    """The same tree through a real sshd: sftp-server would block on opening a FIFO."""
    root = str(tmp_path)
    _hostile_entries(root)
    r = cli(["--ssh-config", str(sshd_lab.config), "-N", "node1", "--host-root", root,
             "sandbox", "list", "-o", "json", "--no-check"])
    assert r.exit_code == 0, r.stderr
    _check_hostile(by_id(r.json()["items"]), ssh=True)


# -- issue 18: runtime-rs state.json as upstream writes it ------------------------------
#: A runtime-rs (3.x/4.x) state.json for Cloud Hypervisor, typed here by hand from the
#: upstream structs rather than produced by katactl.lab.layout, so the reader is not
#: only tested against our own writer: HypervisorState
#: (src/runtime-rs/crates/hypervisor/src/hypervisor_persist.rs) with kata-types'
#: hypervisor config (src/libs/kata-types/src/config/hypervisor/mod.rs, boot/cpu/
#: memory/device/debug info #[serde(flatten)]), pid null and api_socket "" as every
#: runtime-rs driver's save() leaves them; serde_json::to_writer_pretty (2 spaces).
UPSTREAM_RS_STATE = """{
  "sandbox_type": "virt_container",
  "resource": {
    "cgroup_state": {
      "path": "/kubepods/burstable/pod1234/kata_rsup01",
      "overhead_path": "/kata_overhead/rsup01",
      "sandbox_cgroup_only": false
    }
  },
  "hypervisor": {
    "hypervisor_type": "clh",
    "pid": null,
    "uuid": "",
    "api_socket": "",
    "id": "rsup01",
    "vm_path": "/run/kata/rsup01",
    "jailed": false,
    "jailer_root": "",
    "netns": "/var/run/netns/cni-0d6d",
    "config": {
      "path": "/opt/kata/bin/cloud-hypervisor",
      "valid_hypervisor_paths": ["/opt/kata/bin/cloud-hypervisor"],
      "ctlpath": "",
      "jailer_path": "",
      "block_device_driver": "virtio-blk-pci",
      "kernel": "/opt/kata/share/kata-containers/vmlinux.container",
      "kernel_params": "",
      "initrd": "",
      "image": "/opt/kata/share/kata-containers/kata-containers.img",
      "rootfs_type": "ext4",
      "firmware": "",
      "vm_rootfs_driver": "virtio-blk-pci",
      "cpu_features": "",
      "default_vcpus": 1.5,
      "default_maxvcpus": 8,
      "enable_debug": false,
      "log_level": "info",
      "guest_memory_dump_paging": false,
      "guest_memory_dump_path": "",
      "extra_monitor_socket": "",
      "default_bridges": 1,
      "reclaim_guest_freed_memory": true,
      "machine_type": "",
      "default_memory": 3072,
      "memory_slots": 10,
      "default_maxmemory": 0,
      "enable_virtio_mem": false,
      "shared_fs": "virtio-fs",
      "virtio_fs_daemon": "/opt/kata/libexec/virtiofsd",
      "factory": {"enable_template": false, "template_path": ""},
      "prefetch_list_path": "",
      "disable_guest_selinux": true,
      "disable_selinux": false
    },
    "run_dir": "/run/kata/rsup01",
    "cached_block_devices": [],
    "virtiofs_daemon_pid": 0,
    "passfd_listener_port": null
  }
}"""


def test_runtime_rs_upstream_state_json_fields(tmp_path):
    """Before: vcpus, memory, kernel, image all null (the reader looked for cpu_info/...)."""
    root = str(tmp_path)
    layout.write_rs_sandbox(root, "rsup01", hypervisor="clh", pod_name="p", raw_state=UPSTREAM_RS_STATE.encode())
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert (sb.hypervisor, sb.vcpus, sb.max_vcpus, sb.memory_mib) == ("clh", 1.5, 8, 3072)
    assert sb.kernel == "/opt/kata/share/kata-containers/vmlinux.container"
    assert sb.image == "/opt/kata/share/kata-containers/kata-containers.img" and sb.initrd is None
    assert sb.hypervisor_path == "/opt/kata/bin/cloud-hypervisor"
    assert (sb.reclaim_guest_freed_memory, sb.virtio_mem) == (True, False)
    assert sb.hypervisor_pid is None and sb.api_socket == "/run/kata/rsup01/ch-api.sock"
    assert sb.sandbox_cgroup_path == "/kubepods/burstable/pod1234/kata_rsup01"


@pytest.mark.parametrize("release,hv_type", [("3.29", "cloud-hypervisor"), ("3.30", "clh")])
def test_runtime_rs_cloud_hypervisor_names_by_release(tmp_path, release, hv_type):
    """runtime-rs names Cloud Hypervisor 'cloud-hypervisor' up to 3.29, 'clh' from 3.30
    (kata-types config/hypervisor/ch.rs HYPERVISOR_NAME_CH); both read as clh."""
    root = str(tmp_path)
    p = layout.write_rs_sandbox(root, "rsch01", hypervisor="clh", release=release)
    assert json.load(open(p.state_file))["hypervisor"]["hypervisor_type"] == hv_type
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert sb.hypervisor == "clh"


def test_lab_writes_runtime_rs_upstream_shape(tmp_path):
    """The lab's writer: flat config, pid null, api_socket "", pretty (2 spaces)."""
    p = layout.write_rs_sandbox(str(tmp_path), "rsshp1", hypervisor="qemu", pid=os.getpid(), vcpus=2)
    text = open(p.state_file).read()
    assert text.startswith('{\n  "sandbox_type"')
    hv = json.loads(text)["hypervisor"]
    assert hv["pid"] is None and hv["api_socket"] == "" and hv["run_dir"] == ""
    assert hv["config"]["default_vcpus"] == 2.0 and "cpu_info" not in hv["config"]
    assert open(os.path.join(p.bundle, "shim.pid")).read() == str(os.getpid())


@pytest.mark.parametrize("jailed", [True, False])
def test_runtime_rs_firecracker_socket_from_run_dir(tmp_path, jailed):
    """Jailed: state.json and fc.sock under /run/kata/firecracker/<id>/root/ (before: 'state.json
    is missing' plus a fake sandbox named 'firecracker'); unjailed: /run/kata/<id>/run/fc.sock."""
    root = str(tmp_path)
    sid = "a" * 64
    p = layout.write_rs_sandbox(root, sid, hypervisor="fc", jailed=jailed, pod_name="fn")
    sbs = sandbox.discover(LocalTransport(root), check=False)
    assert [s.id for s in sbs] == [sid]
    sb = sbs[0]
    assert sb.raw is not None and sb.hypervisor == "fc" and sb.pod["name"] == "fn"
    if jailed:
        assert sb.state_file == f"/run/kata/firecracker/{sid}/root/state.json"
        assert sb.api_socket == f"/run/kata/firecracker/{sid}/root/run/fc.sock"
    else:
        assert sb.state_file == f"/run/kata/{sid}/state.json"
        assert sb.api_socket == f"/run/kata/{sid}/run/fc.sock"
    assert sb.api_socket == p.api_socket_node and sb.shim_socket == f"/run/kata/{sid}/shim-monitor.sock"
    assert sandbox.resolve(LocalTransport(root), sid[:6], check=False).state_file == sb.state_file


def _child(argv0: str, *args: str):
    """A real child process of this test (the 'shim') whose command line is argv0 + args."""
    import subprocess
    import sys

    p = subprocess.Popen([argv0, "-c", "import time; time.sleep(60)", *args], executable=sys.executable)
    # Popen returns once the child is past vfork's hold in execve, a moment before the kernel
    # sets its argv: /proc/<pid>/cmdline can still read empty (fast discovery saw that)
    for _ in range(500):
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if f.read().startswith(argv0.encode() + b"\0"):
                return p
        time.sleep(0.01)
    raise AssertionError(f"{argv0}: argv not set after 5 s")


def test_runtime_rs_vmm_found_through_the_shim(tmp_path):
    """runtime-rs persists pid null: the VMM is the shim (Dragonball) or the shim's child
    whose command line names the sandbox (QEMU -name sandbox-<id>); virtiofsd, also a child
    naming the sandbox, is not the VMM. Before: hypervisorPid null for every one."""
    with node() as n:
        me = os.getpid()
        q, c = "rsq" + "1" * 61, "rsc" + "2" * 61
        n.rs("rsdb01", hypervisor="dragonball", pid=me)
        n.rs(q, hypervisor="qemu", pid=me)
        n.rs(c, hypervisor="clh", pid=me)
        n.rs("rsnopid", hypervisor="qemu", pid=None)
        procs = [_child("/opt/kata/libexec/virtiofsd", f"--socket-path=/run/kata/{q}/vhost-fs.sock"),
                 _child("/opt/kata/bin/qemu-system-x86_64", "-name", f"sandbox-{q}"),
                 _child("/opt/kata/bin/cloud-hypervisor", "--api-socket", f"/run/kata/{c}/ch-api.sock")]
        try:
            for t in (LocalTransport(n.root),):
                sbs = {s.id: s for s in sandbox.discover(t)}
                assert sbs["rsdb01"].hypervisor_pid == me and sbs["rsdb01"].shim_pid == me
                assert sbs[q].hypervisor_pid == procs[1].pid and sbs[q].vmm_note is None
                assert sbs[c].hypervisor_pid == procs[2].pid
                assert sbs["rsnopid"].hypervisor_pid is None
                assert "no shim.pid in the bundle" in sbs["rsnopid"].vmm_note
                assert all(sbs[i].state == "running" for i in ("rsdb01", q, c))
                assert sandbox.resolve(t, q[:8]).hypervisor_pid == procs[1].pid
                assert sbs[q].to_dict()["shimPid"] == me
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_inspect_threads_and_audit_cover_runtime_rs_vmms(cli):
    """Before: inspect threads said 'no hypervisor pid recorded' and audit skipped them silently."""
    with node() as n:
        os.symlink("/sys", os.path.join(n.root, "sys"))
        q = "rsq" + "3" * 61
        n.rs(q, hypervisor="qemu", pid=os.getpid(), pod_name="q", pod_namespace="batch")
        n.rs("rsnone", hypervisor="qemu", pid=None, pod_name="lost", pod_namespace="batch")
        vmm = _child("/opt/kata/bin/qemu-system-x86_64", "-name", f"sandbox-{q}")
        try:
            r = cli(["--host-root", n.root, "inspect", "threads", "batch/q", "-o", "json"])
            assert r.exit_code == 0, r.stderr
            assert r.json()["pid"] == vmm.pid and r.json()["threads"] >= 1
            r = cli(["--host-root", n.root, "inspect", "threads", "batch/lost", "-o", "json"])
            assert r.exit_code == 3 and "runtime-rs persists no VMM pid" in r.json()["message"]
            r = cli(["--host-root", n.root, "audit", "-o", "json"])
            assert r.exit_code in (0, 8), r.stderr
            said = [i for i in r.json()["items"] if i["check"] == "kata.unreadable"]
            assert [i["target"] for i in said] == ["sandbox rsnone (pod batch/lost)"], said
            assert "no shim.pid in the bundle" in said[0]["message"]
        finally:
            vmm.kill()
            vmm.wait()


def _write_config(root: str, text: str, rel: str = "etc/kata-containers/configuration.toml") -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("monitor,exposed", [("qmp", True), ("hmp", False)])
def test_go_config_only_fields_come_from_the_configuration(tmp_path, monitor, exposed):
    """Go's persist.json never holds GuestMemoryDumpPath, ReclaimGuestFreedMemory, EnablePprof
    or ExtraMonitorSocket (virtcontainers dumpConfig): before, pprofEnabled read false with
    enable_pprof = true, and an HMP extra monitor was probed as QMP."""
    root = str(tmp_path)
    p = layout.write_go_sandbox(root, "cfg001", extra_monitor_socket=True)
    open(p.extra_monitor_socket, "w").close()
    persist = json.load(open(p.state_file))
    hc = persist["Config"]["HypervisorConfig"]
    assert not {"GuestMemoryDumpPath", "ReclaimGuestFreedMemory", "ExtraMonitorSocket"} & set(hc)
    assert "EnablePprof" not in persist["Config"]
    _write_config(root, f'[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/kata"\n'
                        f'reclaim_guest_freed_memory = true\nextra_monitor_socket = "{monitor}"\n'
                        "[runtime]\nenable_pprof = true\n")
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert sb.guest_memory_dump_path == "/var/crash/kata" and sb.reclaim_guest_freed_memory is True
    assert sb.enable_pprof is True
    assert (sb.extra_monitor_socket == "/run/vc/vm/cfg001/extra-monitor.sock") is exposed


@pytest.mark.parametrize("value,want", [("1", True), ("t", True), ("True", True), ("TRUE", True),
                                        ("0", False), ("yes", False), ("", False)])
def test_pprof_annotation_is_go_parsebool(tmp_path, value, want):
    root = str(tmp_path)
    layout.write_go_sandbox(root, "pp0001",
                            extra_annotations={"io.katacontainers.config.runtime.enable_pprof": value})
    _write_config(root, "[hypervisor.qemu]\n[runtime]\nenable_pprof = false\n")
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert sb.enable_pprof is want


@pytest.mark.parametrize("ref", ["abc123\n", "abc123\r\n", "ns/pod\n", "ns\n/pod", "pod/ns/pod\n"])
def test_sandbox_refs_with_a_trailing_newline_are_refused(ref):
    """issue 16, finding 4: '$' in a pattern admits a trailing newline; refs are matched whole."""
    from katactl.errors import UsageError
    from katactl.sandbox import parse_ref

    with pytest.raises(UsageError):
        parse_ref(ref)


def test_discovery_leaves_no_cyclic_garbage(tmp_path):
    """What discovery made and dropped is freed by reference counting: its pause of the GC
    ends by moving what is left to the oldest generation (katactl.gcpause), so a reference
    cycle there (a listing's error kept with its traceback: the frame holds the listing)
    would keep the whole listing until a full collection."""
    import gc

    root = str(tmp_path)
    for i in range(30):
        layout.write_go_sandbox(root, f"cyc{i:03d}", pid=None, pod_name=f"p{i}", pod_namespace="ns")
    t = LocalTransport(root)  # no /run/kata, no CRI-O dir: listings that fail
    sandbox.discover(t)  # imports and caches first
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        sbs = sandbox.discover(t)
        found = gc.collect()
    finally:
        if was:
            gc.enable()
    assert len(sbs) == 30 and found == 0


def test_created_is_the_state_dirs_mtime_without_a_bundle_spec(tmp_path):
    """created: the bundle config.json's mtime, else the state dir's: the local listing has
    no mtime (it stats no entry), so discovery stats the state dir of those sandboxes; the
    SSH and kube transports list it with the entry (the transport default here)."""
    from katactl.backends.base import NodeTransport

    root = str(tmp_path)
    layout.write_go_sandbox(root, "withspec", pid=None)
    layout.write_go_sandbox(root, "nobundle", pid=None, bundle=False)
    layout.write_rs_sandbox(root, "rsnobndl", bundle=False)
    layout.write_go_sandbox(root, "nospec", pid=None)
    os.unlink(f"{root}/run/containerd/io.containerd.runtime.v2.task/k8s.io/nospec/config.json")
    layout.write_rs_sandbox(root, "jailfc", hypervisor="fc", jailed=True, bundle=False)
    when = {"withspec": 1700000000, "nobundle": 1600000000, "rsnobndl": 1500000000, "nospec": 1400000000,
            "jailfc": 1300000000}
    os.utime(f"{root}/run/containerd/io.containerd.runtime.v2.task/k8s.io/withspec/config.json", (1, when["withspec"]))
    for sid, d in (("nobundle", "run/vc/sbs"), ("rsnobndl", "run/kata"), ("nospec", "run/vc/sbs"),
                   ("jailfc", "run/kata")):
        os.utime(f"{root}/{d}/{sid}", (1, when[sid]))
    # jailed: listed as /run/kata/<id> (its shim's directory) before the jail's directory
    os.utime(f"{root}/run/kata/firecracker/jailfc", (1, 1200000000))

    class Listed(LocalTransport):
        """The transport default: kinds and mtimes read off scan_dirs."""

        list_kinds = NodeTransport.list_kinds

    for t in (LocalTransport(root), Listed(root)):
        got = {s.id: s.created for s in sandbox.discover(t, check=False)}
        assert got == when, type(t).__name__


# -- one sandbox ref over a node selection (sandbox.locate) -----------------------------
@pytest.fixture(scope="module")
def fleet2(tmp_path_factory):
    """Two real sshd nodes of their own (the session lab's trees are shared): node1 holds
    abc1…, abc2…, abd1…, abd2…; node2 holds abc3… and dddd…; an unreachable node 'down'."""
    from tests.conftest_sshd import SSHD, SshLab

    if not (os.path.exists(SSHD) and shutil.which("ssh")):
        pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
    lab = SshLab(tmp_path_factory.mktemp("fleet2"))
    try:
        lab.add_node("node1")
        lab.add_node("node2")
        lab.add_unreachable("down")
        lab.write_config()
        lab.wait_ready()
        for n, ids in (("node1", ["abc1", "abc2", "abd1", "abd2"]), ("node2", ["abc3"])):
            for sid in ids:
                layout.write_go_sandbox(str(lab.nodes[n].root), sid + "0" * 60, pod_name=f"pod-{sid}",
                                        pod_namespace="p")
        layout.write_go_sandbox(str(lab.nodes["node2"].root), "d" * 64, pod_name="solo", pod_namespace="p")
        yield lab
    finally:
        from katactl.backends import ssh

        ssh.close_pool()
        lab.stop()


def test_a_prefix_ambiguous_on_one_node_is_ambiguous_over_the_selection(cli, fleet2):
    """abc is ambiguous on node1 and unique on node2: three sandboxes match, so no node's
    single match may be picked (exit 3, node:id candidates), for reads and writes alike."""
    base = ["--ssh-config", str(fleet2.config), "-N", "node1,node2"]
    want = [{"node": "node1", "id": "abc1" + "0" * 60}, {"node": "node1", "id": "abc2" + "0" * 60},
            {"node": "node2", "id": "abc3" + "0" * 60}]
    for cmd in (["sandbox", "inspect", "abc"], ["balloon", "get", "abc"]):
        r = cli([*base, *cmd, "-o", "json"])
        assert r.exit_code == 3, (cmd, r.exit_code, r.stdout, r.stderr)
        err = r.json()
        assert err["code"] == "Ambiguous" and err["details"]["candidates"] == want, err
    r = cli([*base, "sandbox", "inspect", "abc"])
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert "node1:abc10000" in r.stderr and "node2:abc30000" in r.stderr
    # ambiguous on one node only: the same node:id candidates, naming that node
    r = cli([*base, "sandbox", "inspect", "abd", "-o", "json"])
    assert r.exit_code == 3 and r.json()["details"]["candidates"] == [
        {"node": "node1", "id": "abd1" + "0" * 60}, {"node": "node1", "id": "abd2" + "0" * 60}], r.stdout
    assert "on node1:" in r.json()["message"]
    # a prefix unique over the whole selection still resolves
    r = cli([*base, "sandbox", "inspect", "abc3", "-o", "json"])
    assert r.exit_code == 0 and r.json()["id"] == "abc3" + "0" * 60, r.stderr


def test_a_pod_or_prefix_with_a_node_not_searched_is_refused_for_writes_too(cli, fleet2):
    """balloon set (a mutating command) refuses the same way, over real SSH; nothing is set."""
    base = ["--ssh-config", str(fleet2.config), "-N", "node2,down"]
    for ref in ("abc3", "p/pod-abc3"):
        r = cli([*base, "balloon", "set", ref, "--target", "1Gi", "-o", "json"])
        assert r.exit_code == 5, (ref, r.exit_code, r.stdout, r.stderr)
        assert r.json()["details"]["match"] == {"node": "node2", "id": "abc3" + "0" * 60}
        assert list(r.json()["details"]["notSearched"]) == ["down"]
    r = cli([*base, "sandbox", "inspect", "d" * 64, "-o", "json"])
    assert r.exit_code == 0 and r.json()["node"] == "node2"
