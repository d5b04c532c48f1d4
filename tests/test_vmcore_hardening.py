"""vmcore hardening (issue 16): a refused or failed trigger leaves nothing behind, a dry
run makes the real run's checks, malformed node files and indexes are clear errors,
multi-node rm names the node that failed."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

from katactl.lab import layout
from katactl.lab.shimserver import Response, ShimServer
from tests.test_vmcore import DUMP_PATH, _audit_entries, node_tree

CLH_SID = "c1c1c1c1d2d2d2d2e3e3e3e3f4f4f4f4"


@pytest.fixture
def clh_node():
    from katactl.lab.clh_server import ClhServer

    root = node_tree(tempfile.mkdtemp(prefix="kc", dir="/tmp"))
    servers = []

    def make(memory_mib=256):
        sb = layout.write_go_sandbox(root, CLH_SID, hypervisor="clh", memory_mib=memory_mib,
                                     guest_memory_dump_path=DUMP_PATH)
        servers.append(ClhServer(sb.real(sb.api_socket_node), 256 << 20, features=("kvm", "guest_debug")))
        return root

    make.servers = servers  # type: ignore[attr-defined]
    yield make
    for s in servers:
        s.close()
    shutil.rmtree(root, ignore_errors=True)


def _dump_root(root):
    return os.path.join(root, DUMP_PATH.lstrip("/"))


def test_trigger_space_refusal_leaves_nothing_and_dry_run_refuses_too(cli, clh_node, _isolated_home):
    """issue 16 #9: exit 5 for space left <dump>/<id>/ with hypervisor.conf, .version and
    state/; and --dry-run said 0. Both now refuse before creating anything."""
    root = clh_node(memory_mib=1 << 40)  # 1 EiB of guest memory: never 2x free
    for extra in (["--dry-run"], []):
        r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], *extra, "-o", "json"])
        assert r.exit_code == 5, (extra, r.stderr)
        assert "2 x guest memory" in r.stderr and "Traceback" not in r.stderr
        assert not os.path.exists(_dump_root(root)), os.listdir(os.path.dirname(_dump_root(root)))
    [e] = _audit_entries(_isolated_home)  # the real run only
    assert e["result"] == "error" and e["changed"] is False


def test_trigger_failed_dump_cleans_up(cli, clh_node):
    """The hypervisor fails the dump after the metadata was written: the new <id>/ goes;
    an existing one keeps what it had (an earlier dump) and loses only what was added.
    The failure is the server's real answer (500, a JSON array of messages) read by our
    Cloud Hypervisor client, not a patched client."""
    root = clh_node()
    [srv] = clh_node.servers
    srv.fail_coredump(["Error from API", "Failed to coredump the VM", "the VM is not running"])
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6]])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert ("Cloud Hypervisor answered 500: Error from API; Failed to coredump the VM; the VM is not running"
            in r.stderr), r.stderr
    assert not os.path.exists(_dump_root(root))
    # with an earlier dump in place
    d = os.path.join(_dump_root(root), CLH_SID)
    os.makedirs(os.path.join(d, "state", "old"))
    for n in ("hypervisor.conf", "hypervisor.version", "vmcore-20240102030405.elf"):
        with open(os.path.join(d, n), "w") as f:
            f.write("earlier\n")
    before = sorted(os.listdir(d)), sorted(os.listdir(os.path.join(d, "state")))
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6]])
    assert r.exit_code == 1, r.stderr
    assert (sorted(os.listdir(d)), sorted(os.listdir(os.path.join(d, "state")))) == before
    srv.fail_coredump(None)
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert os.path.isfile(os.path.join(root, r.json()["path"].lstrip("/")))


def _config_node(tmp_path, body: str | None = None, dropin: str | None = None):
    from tests.test_vmcore import add_dump

    root = node_tree(tmp_path / "n")
    add_dump(root)
    base = os.path.join(root, "usr/share/defaults/kata-containers")
    if body is not None:
        with open(os.path.join(base, "configuration.toml"), "w") as f:
            f.write('[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n' + body)
    if dropin is not None:
        with open(os.path.join(base, "config.d/50-vmcore.toml"), "w") as f:
            f.write("[hypervisor.qemu]\n" + dropin)
    return root, base


@pytest.mark.parametrize("body,dropin,where,key", [
    ('default_memory = "lots"\n', None, "configuration.toml", "default_memory"),
    ("default_memory = inf\n", None, "configuration.toml", "default_memory"),
    ("default_memory = [1, 2]\n", None, "configuration.toml", "default_memory"),
    ("default_memory = -5\n", None, "configuration.toml", "default_memory"),
    ("default_memory = 2048.5\n", None, "configuration.toml", "default_memory"),
    ("default_memory = {a = {b = 1}}\n", None, "configuration.toml", "default_memory"),
    (None, f'guest_memory_dump_path = "{DUMP_PATH}"\ndefault_memory = true\n', "50-vmcore.toml",
     "default_memory"),                                                          # the drop-in is named
    (None, "guest_memory_dump_path = 5\n", "50-vmcore.toml", "guest_memory_dump_path"),
    (None, 'guest_memory_dump_path = "var/crash"\n', "50-vmcore.toml", "guest_memory_dump_path"),
    (None, f'guest_memory_dump_path = "{DUMP_PATH}"\nguest_memory_dump_paging = "yes"\n', "50-vmcore.toml",
     "guest_memory_dump_paging"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", None, "configuration.toml", "nested too deeply"),
])
def test_malformed_node_configuration_names_file_and_key(cli, tmp_path, body, dropin, where, key):
    """issue 16 #13: values the runtime would refuse ended in 'unexpected ValueError/
    OverflowError/TypeError/RecursionError'; a problem in a node's own file is exit 1
    naming the file and the key."""
    root, _ = _config_node(tmp_path, body, dropin)
    r = cli(["--host-root", root, "vmcore", "list"])
    assert r.exit_code == 1, r.stderr
    assert where in r.stderr and key in r.stderr, r.stderr
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_fifo_configuration_is_refused_not_read(katactl_bin, tmp_path):
    """A FIFO as configuration.toml (or a drop-in) hung every vmcore command."""
    root, base = _config_node(tmp_path)
    for name in ("config.d/60-fifo.toml", "configuration.toml"):
        os.mkfifo(os.path.join(base, name + ".fifo"))
        if name == "configuration.toml":
            os.remove(os.path.join(base, name))
        os.rename(os.path.join(base, name + ".fifo"), os.path.join(base, name))
        r = katactl_bin(["--host-root", root, "vmcore", "list"], timeout=60)
        assert r.exit_code == 1 and "not a regular file" in r.stderr and name in r.stderr, r.stderr


def test_trigger_kata_config_that_does_not_exist_is_not_ignored(cli, clh_node):
    """issue 16 #19: with the dump path known from the sandbox, trigger ignored a
    --kata-config naming nothing (list says 3)."""
    root = clh_node()
    for sub in (["trigger", CLH_SID[:6], "--dry-run"], ["list"]):
        r = cli(["--host-root", root, "vmcore", *sub, "--kata-config", "/nonexistent.toml"])
        assert r.exit_code == 3 and "/nonexistent.toml" in r.stderr, (sub, r.stderr)
    assert not os.path.exists(_dump_root(root))


def test_damaged_local_index_and_manifest_do_not_break_list_or_collect(cli, tmp_path, _isolated_home):
    """issue 16 #13: a non-UTF-8 line in the local collect index broke 'vmcore list'
    entirely; a deeply nested manifest.json ended collect in 'unexpected RecursionError'.
    Both are katactl's own records: a damaged part is skipped, the command goes on."""
    from tests.test_vmcore import add_dump

    root = node_tree(tmp_path / "n")
    add_dump(root)
    index = _isolated_home / "state" / "katactl" / "vmcore-collected.jsonl"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(b"\xff\xfe not utf-8\n" + b"[" * 100000 + b"\n"
                      + b'{"key": 5, "mtime": "x", "dir": [], "to": null}\n'
                      + b'{"key": "k", "mtime": "later", "dir": "/x", "to": "/x/y"}\n')
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert [i["collected"] for i in r.json()["items"]] == [False]
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(b'{"files": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(out), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0 and [i["collected"] for i in r.json()["items"]] == [True], r.stderr


@pytest.mark.parametrize("sidecar,why", [
    (None, "no readable record"),
    ({"source": "another dump", "srcOffset": 0, "dstOffset": 0}, "another source"),
    ("SAME:10:999999", "shorter than its last checkpoint"),
    ("SAME:0:0", "no complete zstd segment"),
    ("SAME:x:[]", "no complete zstd segment"),       # a damaged sidecar: start again, say so
])
def test_collect_says_why_a_partial_copy_was_not_resumed(cli, tmp_path, sidecar, why):
    """issue 16 #19: a dropped zstd .partial reported resumed: false and nothing else."""
    import json

    from tests.test_vmcore import SID, TS, add_dump

    if not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    root = node_tree(tmp_path / "n")
    add_dump(root, data=os.urandom(100_000))
    out = tmp_path / "out"
    final = out / "node-a" / SID / f"vmcore-{TS}.elf.zst"
    final.parent.mkdir(parents=True)
    (final.parent / (final.name + ".partial")).write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(5000))
    if sidecar is not None:
        if isinstance(sidecar, str) and sidecar.startswith("SAME:"):
            # the record of this very copy, as collect writes it (source = the dump's identity)
            r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
            [it] = r.json()["items"]
            _, src_off, dst_off = sidecar.split(":")

            def num(v: str) -> int | str:
                return int(v) if v.isdigit() else v

            sidecar = {"source": {"path": it["path"], "size": it["size"], "mtime": it["mtime"],
                                  "compress": "zstd", "node": "localhost"},
                       "srcOffset": num(src_off), "dstOffset": num(dst_off)}
        (final.parent / (final.name + ".partial.json")).write_text(json.dumps(sidecar))
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(out), "--compress", "zstd", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["resumed"] is False and why in it.get("note", ""), it
    assert "discarded" in it["note"] and final.exists()


def test_rm_across_nodes_names_a_node_that_failed_while_listing(cli, sshd_lab):
    """issue 16 #20: with -N a,b where a failed while the dumps were listed, the result
    omitted a and exited 0; upgrade gc said 4. Both go through katactl.planapply now.
    Two real nodes (sshd on loopback, each serving its own tree), reached as -N names."""
    from tests.test_vmcore import SID, TS, add_dump

    names = ("vmrm-a", "vmrm-b")
    for n in names:
        if n not in sshd_lab.nodes:
            sshd_lab.add_node(n, known="plain")
    sshd_lab.write_config()
    sshd_lab.wait_ready()
    roots = {}
    for n in names:
        roots[n] = str(sshd_lab.nodes[n].root)
        shutil.rmtree(os.path.join(roots[n], DUMP_PATH.lstrip("/")), ignore_errors=True)
        node_tree(roots[n])
        add_dump(roots[n])
    with open(os.path.join(roots["vmrm-a"], "usr/share/defaults/kata-containers/configuration.toml"), "a") as f:
        f.write("[broken\n")  # vmrm-a: its own configuration is broken
    for extra in (["--dry-run"], ["--yes"]):
        r = cli(["-N", ",".join(names), "--ssh-config", str(sshd_lab.config), "vmcore", "rm", SID[:8], *extra,
                 "-o", "json"])
        assert r.exit_code == 4, (extra, r.stdout, r.stderr)
        d = r.json()
        assert [(e["node"], "configuration.toml" in e["error"]["message"]) for e in d["errors"]] == [
            ("vmrm-a", True)]
        assert [(i["node"], i["changed"]) for i in d["items"]] == [("vmrm-b", True)]
    assert not os.path.exists(os.path.join(roots["vmrm-b"], DUMP_PATH.lstrip("/"), SID))
    assert os.path.exists(os.path.join(roots["vmrm-a"], DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf"))


@pytest.mark.parametrize("which", ["", ".partial"])
def test_collect_target_that_is_a_directory_names_it(cli, tmp_path, which):
    """issue 16 #17: a directory where the copy goes said '....partial: Is a directory'."""
    from tests.test_vmcore import SID, TS, add_dump

    root = node_tree(tmp_path / "n")
    add_dump(root)
    out = tmp_path / "out"
    target = out / "node-a" / SID / f"vmcore-{TS}.elf{which}"
    target.mkdir(parents=True)
    for extra in (["--dry-run"], []):
        r = cli(["--host-root", root, "vmcore", "collect", "--to", str(out), *extra])
        assert r.exit_code == 1 and f"{target}: is a directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert target.is_dir() and sorted(os.listdir(target.parent)) == [target.name]


def test_trigger_on_runtime_rs_says_no_panic_dump(cli, _isolated_home):
    """issue 18: runtime-rs accepts guest_memory_dump_path but writes no vmcore on a guest
    panic (no GUEST_PANICKED handler): a trigger on a runtime-rs sandbox says its dump is
    katactl's own."""
    from katactl.lab.clh_server import ClhServer

    root = node_tree(tempfile.mkdtemp(prefix="kc", dir="/tmp"))
    try:
        sb = layout.write_rs_sandbox(root, CLH_SID, hypervisor="clh", memory_mib=256, pid=os.getpid(),
                                     guest_memory_dump_path=DUMP_PATH)
        srv = ClhServer(sb.real(sb.api_socket_node), 256 << 20, features=("kvm", "guest_debug"))
        try:
            r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], "-o", "json"])
        finally:
            srv.close()
        assert r.exit_code == 0, r.stderr
        assert "runtime-rs writes no vmcore when a guest panics" in r.json()["note"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_trigger_uses_the_sandboxs_own_configuration(cli, tmp_path):
    """On a kata-deploy node the node-wide search finds kata-static's default (here with a
    dump path) while the sandbox's handler (kata-clh) sets none: the trigger says so about
    the sandbox's file instead of dumping where its runtime never would."""
    root = str(tmp_path / "n")
    hs = layout.write_kata_deploy(root, {"clh": '[hypervisor.clh]\npath = "/opt/kata/bin/cloud-hypervisor"\n'})
    with open(os.path.join(root, "opt/kata/share/defaults/kata-containers/configuration.toml"), "w") as f:
        f.write(f'[hypervisor.qemu]\nguest_memory_dump_path = "{DUMP_PATH}"\n')
    sb = layout.write_go_sandbox(root, CLH_SID, hypervisor="clh", memory_mib=256)
    layout.write_shim_binary_path(root, sb.bundle_node, hs["kata-clh"].runtime_path)
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], "--dry-run"])
    assert r.exit_code == 3, r.stderr
    assert "guest_memory_dump_path is not set in" in r.stderr and "configuration-clh.toml" in r.stderr


def _damage(root: str, what: str) -> None:
    """SID2's dump directory (or the node) with one file made hostile: a FIFO where a dump,
    hypervisor.version/.conf, a saved state file, the bundle's config.json or /etc/localtime
    is read, a directory named like a dump, or a hypervisor.conf of the wrong shape."""
    from katactl.sandbox import CONTAINERD_TASK_DIR
    from tests.test_vmcore import SID2

    d = os.path.join(_dump_root(root), SID2)
    kind, _, name = what.partition(":")
    if kind in ("fifo", "dir"):
        p = {"dump": os.path.join(d, "vmcore-20240101000001.elf"),
             "state": os.path.join(d, "state", SID2, "persist.json"),
             "bundle": os.path.join(root, CONTAINERD_TASK_DIR.lstrip("/"), "k8s.io", SID2, "config.json"),
             "localtime": os.path.join(root, "etc", "localtime")}.get(name, os.path.join(d, name))
        if os.path.lexists(p):
            os.remove(p)
        (os.mkfifo if kind == "fifo" else os.mkdir)(p)
        return
    with open(os.path.join(d, "hypervisor.conf"), "wb") as f:
        f.write({"memsize": lambda: json.dumps({"MemorySize": json.loads(name)}).encode(),
                 "conf": lambda: {"garbage": b"{not json", "nested": b"[" * 100000, "list": b"[256]"}[name]}[kind]())


@pytest.mark.parametrize("what", [
    "fifo:dump", "fifo:hypervisor.version", "fifo:hypervisor.conf", "fifo:state", "fifo:bundle", "fifo:localtime",
    "dir:dump", 'memsize:"256M"', "memsize:[256]", "memsize:true", "memsize:-1", "memsize:1.5", "memsize:1e400",
    "conf:garbage", "conf:nested", "conf:list"])
def test_list_collect_rm_on_a_hostile_dump_dir_never_hang_nor_hide_healthy_dumps(katactl_bin, tmp_path, what):
    """Review 8 #3: a FIFO named like a dump or as hypervisor.version hung vmcore list (and
    collect, rm: they list first) forever; a hypervisor.conf whose MemorySize is not an
    integer failed the whole list (exit 1, ValueError), hiding the healthy dumps of other
    sandboxes. Only regular files are read now; a broken dump is one item with a problem."""
    from tests.test_vmcore import SID, SID2, TS, add_dump

    root = node_tree(tmp_path / "n")
    add_dump(root, SID)
    add_dump(root, SID2)
    _damage(root, what)
    r = katactl_bin(["--host-root", root, "vmcore", "list", "-o", "json"], timeout=60)
    assert r.exit_code == 0, r.stderr
    items = {i["name"]: i for i in json.loads(r.stdout)["items"]}
    healthy = [f"{SID}/vmcore-{TS}.elf", f"{SID2}/vmcore-{TS}.elf"]
    assert [items[n]["status"] for n in healthy] == ["ok", "ok"]
    assert items[healthy[0]]["guestMemory"] == 512 << 20 and items[healthy[0]]["problem"] is None
    odd = f"{SID2}/vmcore-20240101000001.elf"
    if what.endswith(":dump"):
        kind = "a FIFO" if what.startswith("fifo") else "a directory"
        assert items[odd]["status"] == "not-regular" and kind in items[odd]["problem"], items[odd]
    else:
        assert odd not in items and len(items) == 2
    if what in ("fifo:hypervisor.conf",) or what.startswith(("memsize", "conf")):
        assert items[healthy[1]]["guestMemory"] is None
    if what == "fifo:hypervisor.version":
        assert items[healthy[1]]["hypervisorVersion"] is None
    out = tmp_path / "out"
    r = katactl_bin(["--host-root", root, "vmcore", "collect", "--to", str(out), "-o", "json"], timeout=60)
    if what.endswith(":dump"):   # the odd one fails (exit 1 for it), the two healthy ones are copied: partial
        assert r.exit_code == 4, (r.exit_code, r.stderr)
        [err] = json.loads(r.stdout)["errors"]
        assert err["target"] == odd and f"not a regular file ({kind}): not a dump" in err["error"]["message"], err
    else:
        assert r.exit_code == 0, r.stderr
    assert sorted(i["name"] for i in json.loads(r.stdout)["items"]) == healthy
    r = katactl_bin(["--host-root", root, "vmcore", "rm", healthy[1], "--yes", "-o", "json"], timeout=60)
    assert r.exit_code == 0, r.stderr
    assert not os.path.exists(os.path.join(_dump_root(root), healthy[1]))


SHIM_SID = "5e5e5e5e6f6f6f6f7a7a7a7a8b8b8b8b"


class _DumpingShim(ShimServer):
    """A shim with the vmcore extension (docs/shim-extension.md) whose synchronous POST
    /ext/v1/vmcore takes as long as the test says: it creates the dump named as the runtime
    names it in <dump_path>/<id>/, sets ``posted``, waits for ``release``, completes the file
    (an ELF core) and answers; ``done`` is set then."""

    def __init__(self, socket_path: str, root: str, answer=None):
        super().__init__(socket_path)
        self.root, self.answer = root, answer  # answer(node_path, size): the 200's body instead of the Vmcore
        self.posted, self.release, self.done = threading.Event(), threading.Event(), threading.Event()

    def handle_ext(self, req):
        from katactl.vmcore.dumps import go_timestamp
        from tests.test_vmcore import make_elf_core

        if req.path == "/ext/v1/capabilities":
            return Response(200, json.dumps({"apiVersion": "katactl.io/shim-ext/v1", "kind": "ShimCapabilities",
                                             "hypervisor": "qemu", "features": ["vmcore"]}), "application/json")
        if (req.method, req.path) != ("POST", "/ext/v1/vmcore"):
            return None
        node_path = f"{DUMP_PATH}/{SHIM_SID}/vmcore-{go_timestamp()}.elf"
        real = os.path.join(self.root, node_path.lstrip("/"))
        with open(real, "wb") as f:
            f.write(b"\x7fELF")
        self.posted.set()
        self.release.wait(120)
        size = make_elf_core(real)
        self.done.set()
        if self.answer is not None:
            return Response(200, self.answer(node_path, size), "application/json")
        return Response(200, json.dumps({"apiVersion": "katactl.io/shim-ext/v1", "kind": "Vmcore", "path": node_path,
                                         "format": "elf", "bytes": size}), "application/json")

    def stop(self) -> None:
        self.release.set()
        super().stop()


@pytest.mark.parametrize("stop", ["timeout", "sigterm"])
@pytest.mark.parametrize("via", ["shim-extension", "clh"])
def test_trigger_stopped_while_the_shim_or_clh_dumps_says_the_dump_goes_on(cli, clh_node, tmp_path, via, stop,
                                                                          _isolated_home):
    """Review 8 #1: a trigger through the shim extension (or Cloud Hypervisor's PUT
    vm.coredump) stopped by --timeout or SIGTERM after the request went out was audited
    changed:false with no dump, its error naming no file, while the shim (the hypervisor)
    went on dumping with the guest paused. Now as the QEMU path (test_vmcore_lab): audited
    changed:true with where the dump goes, and the error says so. The shim names its file
    itself: katactl names the directory and the pattern."""
    if via == "clh":
        root, sid, who = clh_node(), CLH_SID, "Cloud Hypervisor"
        [srv] = clh_node.servers
        posted, release = srv.hold_coredump()
    else:
        root, sid, who = node_tree(tempfile.mkdtemp(prefix="ks", dir="/tmp")), SHIM_SID, "the shim"
        sb = layout.write_go_sandbox(root, sid, memory_mib=256, guest_memory_dump_path=DUMP_PATH)
        srv = _DumpingShim(sb.real(sb.shim_socket_node), root).start()
        posted, release = srv.posted, srv.release
    try:
        args = ["--host-root", root, "vmcore", "trigger", sid[:6], "-o", "json"]
        if stop == "timeout":
            r = cli([*args, "--timeout", "300ms"])
            code, out = r.exit_code, r.stdout
        else:
            p = subprocess.Popen([sys.executable, "-m", "katactl", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            try:
                assert posted.wait(60), "the trigger never sent its request"
                p.send_signal(signal.SIGTERM)
                out, _ = p.communicate(timeout=60)
            finally:
                p.kill()
            code = p.returncode
        assert code == (6 if stop == "timeout" else 130), out
        err = json.loads(out)
        path = err["details"]["path"]
        assert path == f"{DUMP_PATH}/{sid}/vmcore-*.elf" if via != "clh" else path.startswith(f"{DUMP_PATH}/{sid}/vmcore-")
        assert err["code"] == ("Timeout" if stop == "timeout" else "Interrupted") and err["details"]["via"] == via
        lead = f"{who} may be writing" if stop == "timeout" else f"interrupted before {who} answered: it may be writing"
        assert (f"{lead} the dump into {path}; if so, a running guest stays paused until it is finished"
                in err["message"]), err["message"]
        [req, a] = _audit_entries(_isolated_home)
        assert req["result"] == "requested"
        assert (a["result"], a["changed"], a["dump"], a["via"], a["requestSent"]) == (
            "timeout" if stop == "timeout" else "interrupted", True, path, via, True)
        d = os.path.join(_dump_root(root), sid)
        assert os.path.isfile(os.path.join(d, "hypervisor.conf"))     # the runtime's metadata stays with the dump
        release.set()
        if via != "clh":
            assert srv.done.wait(60)
        r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
        [it] = json.loads(r.stdout)["items"]
        assert fnmatch.fnmatch(it["path"], path), it
        assert it["status"] == ("ok" if via != "clh" else "unreadable-header")  # the stand-in CLH writes an ELF ident
    finally:
        release.set()
        if via != "clh":
            srv.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("answer", [lambda p, n: json.dumps({"format": "elf", "bytes": n}),
                                    lambda p, n: "ok", lambda p, n: json.dumps({"path": ["x"]})],
                         ids=["no-path", "not-json", "path-list"])
def test_trigger_a_shim_success_naming_no_dump_keeps_the_dump(cli, answer, _isolated_home):
    """Review 9 local #1: the shim wrote the whole dump and answered 200 with a body that names no
    path: the failed trigger's clean-up removed <dump_path>/<id>/, the dump with it, and the audit
    said changed:false. The dump stays, the error names where it is, the audit says changed:true."""
    root = node_tree(tempfile.mkdtemp(prefix="ks", dir="/tmp"))
    sb = layout.write_go_sandbox(root, SHIM_SID, memory_mib=256, guest_memory_dump_path=DUMP_PATH)
    srv = _DumpingShim(sb.real(sb.shim_socket_node), root, answer).start()
    srv.release.set()
    try:
        r = cli(["--host-root", root, "vmcore", "trigger", SHIM_SID[:6], "-o", "json"])
        assert r.exit_code == 1, (r.stdout, r.stderr)
        err = json.loads(r.stdout)
        pattern = f"{DUMP_PATH}/{SHIM_SID}/vmcore-*.elf"
        assert (err["code"], err["details"]["path"], err["details"]["via"]) == ("ProtocolError", pattern,
                                                                               "shim-extension"), err
        assert f"the answer names no dump path: its dump is in {pattern}" in err["message"], err
        [req, a] = _audit_entries(_isolated_home)
        assert req["result"] == "requested"
        assert (a["result"], a["changed"], a["dump"], a["via"]) == ("error", True, pattern, "shim-extension"), a
        d = os.path.join(_dump_root(root), SHIM_SID)
        assert os.path.isfile(os.path.join(d, "hypervisor.conf"))
        [dump] = [f for f in os.listdir(d) if fnmatch.fnmatch(f, "vmcore-*.elf")]
        assert os.path.getsize(os.path.join(d, dump)) > 4
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_trigger_an_unreadable_clh_answer_keeps_the_dump(cli, clh_node, _isolated_home):
    """The same under Cloud Hypervisor: PUT vm.coredump answered with what is not HTTP once the
    file was written is a ProtocolError that keeps the dump's directory (it removed it)."""
    root = clh_node()
    [srv] = clh_node.servers
    srv.garble_coredump()
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], "-o", "json"])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    err = json.loads(r.stdout)
    path = err["details"]["path"]
    assert (err["code"], err["details"]["via"]) == ("ProtocolError", "clh"), err
    assert f"Cloud Hypervisor may be writing the dump into {path}" in err["message"], err
    [req, a] = _audit_entries(_isolated_home)
    assert req["result"] == "requested"
    assert (a["result"], a["changed"], a["dump"], a["via"]) == ("error", True, path, "clh"), a
    assert os.path.isfile(os.path.join(root, path.lstrip("/")))


@pytest.mark.parametrize("kind", ["dir", "fifo"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_rm_of_a_not_regular_dump_is_refused_as_its_dry_run_says(cli, tmp_path, kind, dry_run, _isolated_home):
    """Review 9 local #4: a directory named like a dump (list: not-regular) was "removed" by
    rm --dry-run, then the real rm failed with "Is a directory" and the --host-root path. Both
    now refuse it, before any deletion (the sandbox's other dump stays), naming the node path."""
    from tests.test_vmcore import SID, add_dump

    root = node_tree(tmp_path / "n")
    add_dump(root, SID)
    node_path = f"{DUMP_PATH}/{SID}/vmcore-20240101000001.elf"
    p = os.path.join(root, node_path.lstrip("/"))
    if kind == "dir":
        os.makedirs(os.path.join(p, "sub"))
    else:
        os.mkfifo(p)
    before = sorted(os.listdir(os.path.dirname(p)))
    for ref in (f"{SID}/vmcore-20240101000001.elf", SID):
        r = cli(["--host-root", root, "vmcore", "rm", ref, "--yes", "-o", "json",
                 *(["--dry-run"] if dry_run else [])])
        assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
        msg = r.json()["message"]
        kind_text = "a directory" if kind == "dir" else "a FIFO"
        assert f"{node_path} on node " in msg and f"not a regular file ({kind_text}): not a dump" in msg, msg
        assert root not in msg, msg
    assert sorted(os.listdir(os.path.dirname(p))) == before
    entries = _audit_entries(_isolated_home)
    if dry_run:
        assert entries == []
    else:
        assert [(a["result"], a["changed"], a["params"]["path"]) for a in entries] == [("error", False, node_path)] * 2


@pytest.mark.parametrize("where", ["--dump-path", "configured"])
def test_trigger_dump_path_through_a_file_fails_in_the_dry_run_as_in_the_run(cli, clh_node, where, _isolated_home):
    """review 13 mutate 2: a dump path whose existing part is a regular file passed --dry-run
    (exit 0, changed) while the run failed (exit 1) naming this host's path under --host-root.
    Both now fail alike, exit 1, naming the node's path; nothing is created."""
    root = clh_node()
    # DUMP_PATH (the configured guest_memory_dump_path) itself a regular file, or a --dump-path under one
    f = _dump_root(root) if where == "configured" else os.path.join(root, "etc/kata-deploy.toml")
    os.makedirs(os.path.dirname(f), exist_ok=True)
    with open(f, "w") as fh:
        fh.write("[hypervisor.qemu]\n")
    node_file = "/" + os.path.relpath(f, root)
    extra = ["--dump-path", node_file + "/dumps"] if where == "--dump-path" else []
    answers = []
    for dry in (["--dry-run"], []):
        r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], *extra, *dry, "-o", "json"])
        assert r.exit_code == 1, (dry, r.stdout, r.stderr)
        j = json.loads(r.stdout)
        assert j["kind"] == "Error" and j["exitCode"] == 1 and r.stderr.count("\n") == 1, (j, r.stderr)
        assert node_file in j["message"] and root not in j["message"] + r.stderr, j["message"]
        answers.append(j["message"])
    assert answers[0] == answers[1]
    assert os.path.isfile(f) and not os.path.exists(f + "/dumps")
    [e] = _audit_entries(_isolated_home)  # the real run only
    assert e["result"] == "error" and root not in e["error"], e


def test_trigger_a_failing_write_under_host_root_names_the_node_path(cli, clh_node, _isolated_home):
    """review 13 mutate 2: an error of the node's files under --host-root names the node's path
    (as every other vmcore message does), not this host's mount of it."""
    root = clh_node()
    d = os.path.join(_dump_root(root), CLH_SID)
    os.makedirs(os.path.join(d, "hypervisor.conf", "x"))  # the runtime's metadata file is a non-empty directory
    r = cli(["--host-root", root, "vmcore", "trigger", CLH_SID[:6], "-o", "json"])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    j = json.loads(r.stdout)
    assert f"{DUMP_PATH}/{CLH_SID}/hypervisor.conf" in j["message"] and root not in j["message"], j["message"]
    assert root not in r.stderr and root not in _audit_entries(_isolated_home)[-1]["error"]
