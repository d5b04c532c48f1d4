"""Bench: `katactl metrics --all -o prom` over 200 live lab shim servers vs the shell way of
getting the same exposition: curl each shim's /metrics over its unix socket, then relabel in
awk as kata-monitor (and katactl) do: sandbox_id, cri_uid, cri_name, cri_namespace appended to
every sample (before a summary's quantile / a histogram's le), go_*/process_* renamed
kata_shim_*, families merged across sandboxes with HELP/TYPE once, katactl_scrape_error 0 per
sandbox. Whole processes, runs interleaved. Issue 15's goal (>= 4x faster) is judged against
`xargs -P 32 curl` + awk (katactl's own concurrency); the serial curl loop is a second row.

The shell side is given the sandbox -> pod table (katactl discovers it from persist.json and
the bundles' config.json: work the shell does not do) and does not sort the families.

Usage: .venv/bin/python bench/bench_metrics.py [--shims 200] [--runs 5] [--write] [--smoke]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import add_rev_options, katactl_revs, bench_parser, context, interleaved, precompile, publish, require, shim_node  # noqa: E402

PAR = 32  # katactl scrapes 32 shims at a time: the same concurrency for xargs -P
GOAL = 4.0  # issue 15: metrics --all at least 4x faster than the shell way, at the same concurrency

#: kata-monitor's relabelling (src/runtime/pkg/kata-monitor/metrics.go) in POSIX awk (mawk here).
#: First file: "sandbox uid name namespace" per line; then one scraped file per sandbox, named
#: by its sandbox id.
RELABEL_AWK = r'''
NR == FNR { lab[$1] = "sandbox_id=\"" $1 "\",cri_uid=\"" $2 "\",cri_name=\"" $3 "\",cri_namespace=\"" $4 "\""
            sbs[++nsb] = $1; next }
FNR == 1 { n = split(FILENAME, parts, "/"); L = lab[parts[n]] }
/^# (HELP|TYPE) / {
  name = $3; if (name ~ /^(go|process)_/) name = "kata_shim_" name
  cur = name
  if (!(name in known)) { known[name] = 1; order[++nfam] = name }
  if (!((name, $2) in seen)) { seen[name, $2] = 1; rest = $0; sub(/^# [A-Z]+ [^ ]+/, "", rest)
                               hdr[name] = hdr[name] "# " $2 " " name rest "\n" }
  next }
/^#/ || NF == 0 { next }
{
  sname = $0; sub(/[{ \t].*/, "", sname); rest = substr($0, length(sname) + 1)
  if (sname ~ /^(go|process)_/) sname = "kata_shim_" sname
  fam = (index(sname, cur) == 1) ? cur : sname
  if (!(fam in known)) { known[fam] = 1; order[++nfam] = fam }
  if (substr(rest, 1, 1) == "{") {
    c = index(rest, "}"); body = substr(rest, 2, c - 2); val = substr(rest, c + 1)
    if (match(body, /(le|quantile)="[^"]*"$/)) {
      head = substr(body, 1, RSTART - 1); sub(/,$/, "", head)
      body = (head != "" ? head "," : "") L "," substr(body, RSTART)
    } else body = (body != "" ? body "," : "") L
    out = sname "{" body "}" val
  } else out = sname "{" L "}" rest
  cnt[fam]++; line[fam, cnt[fam]] = out
}
END {
  for (i = 1; i <= nfam; i++) { f = order[i]; printf "%s", hdr[f]; for (j = 1; j <= cnt[f]; j++) print line[f, j] }
  print "# HELP katactl_scrape_error 1 when the sandbox's shim could not be scraped, else 0."
  print "# TYPE katactl_scrape_error gauge"
  for (i = 1; i <= nsb; i++) print "katactl_scrape_error{" lab[sbs[i]] "} 0"
}
'''


def goal(med: dict[str, float]) -> tuple[float, str]:
    """(how many times faster katactl is, "met" or "not met") for issue 15's goal, from the
    median seconds: against `xargs -P` curl, the concurrency a user would use (RESULTS.md
    rule 1), not the serial loop, which forks 200 curls one after another."""
    speedup = med["par"] / med["katactl"]
    return speedup, "met" if speedup >= GOAL else "not met"


def main() -> None:
    ap = bench_parser("5 shims, one run, nothing written")
    ap.add_argument("--shims", type=int, default=200)
    add_rev_options(ap)
    a = ap.parse_args()
    require("curl", "xargs", "awk")
    n = 5 if a.smoke else a.shims
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    with shim_node(n, "met") as (root, shims):
        scraped = f"{root}/scraped"
        os.mkdir(scraped)
        with open(f"{root}/labels", "w") as f:
            f.writelines(f"{p.sandbox_id} uid-{p.sandbox_id} p{i} bench\n" for i, (p, _) in enumerate(shims))
        with open(f"{root}/loop", "w") as f:
            f.writelines(f"{s} {p.sandbox_id}\n" for p, s in shims)
        with open(f"{root}/xargs", "w") as f:
            f.writelines(f"--unix-socket {s} -o {scraped}/{p.sandbox_id}\n" for p, s in shims)
        with open(f"{root}/relabel.awk", "w") as f:
            f.write(RELABEL_AWK)
        awk = f"awk -f {root}/relabel.awk {root}/labels {scraped}/*"
        url = "http://localhost/metrics"
        loop = (f'while read s id; do curl -sf --unix-socket "$s" -o {scraped}/"$id" {url} || exit 1; '
                f"done < {root}/loop && {awk}")
        par = f"xargs -P {PAR} -L 1 curl -sf {url} < {root}/xargs && {awk}"
        revs = katactl_revs(a, f"{root}/revs")
        args = ["--host-root", root, "metrics", "--all", "-o", "prom"]
        kat = [*revs["katactl"][0], *args]
        # equal output first: the same samples (name and labels; values move between scrapes), in any order
        outs = [subprocess.run(argv, capture_output=True, text=True, check=True,
                               env=dict(os.environ, **(revs["katactl"][1] or {}))).stdout
                for argv in (kat, ["sh", "-c", loop], ["sh", "-c", par])]
        samples = [sorted(x.rsplit(" ", 1)[0] for x in o.splitlines() if x and not x.startswith("#")) for o in outs]
        assert samples[0] == samples[1] == samples[2], (len(samples[0]), len(samples[1]), len(samples[2]),
                                                        set(samples[0]) ^ set(samples[1]))
        cmds = {"katactl": (kat, revs["katactl"][1]), "loop": (["sh", "-c", loop], None),
                "par": (["sh", "-c", par], None)}
        if "baseline" in revs:
            cmds["base"] = ([*revs["baseline"][0], *args], revs["baseline"][1])
        med = {k: statistics.median(v) for k, v in interleaved(cmds, runs, warmup=warmup).items()}
    if a.smoke:
        print(f"bench_metrics smoke ok: {n} shims, {len(samples[0])} samples each way")
        return
    ref = med["par"]
    speedup, verdict = goal(med)
    text = "\n".join([
        f"## metrics --all -o prom over {n} live shim servers — bench/bench_metrics.py", "",
        f"Median of {runs} interleaved runs after a warm-up, whole processes; {context(pre)}. "
        f"`metrics --all -o prom` discovers the sandboxes, scrapes every shim ({PAR} at a time), parses "
        "each exposition strictly, relabels it as kata-monitor does and prints one exposition "
        f"({len(samples[0])} samples). The references fetch the same text with curl over the same "
        "sockets and relabel it in awk (mawk) to the same sample lines (checked before timing); they "
        "are given the sandbox -> pod table and do not sort families (less work than katactl's). "
        f"The reference is `xargs -P {PAR} curl`: the concurrency a user would use, and katactl's own; "
        "the serial curl loop is kept for comparison with earlier tables. Servers: lab shim servers "
        "(threaded, one Python process, in the bench process).", "",
        f"| what | seconds | ratio to `xargs -P {PAR} curl` + awk |", "|---|---:|---:|",
        f"| `{revs['katactl'][2]} metrics --all -o prom` | {med['katactl']:.3f} | {med['katactl'] / ref:.2f}x "
        f"({speedup:.1f}x faster) |",
        *([f"| `{revs['baseline'][2]} metrics --all -o prom` (before) | {med['base']:.3f} | "
           f"{med['base'] / ref:.2f}x ({ref / med['base']:.1f}x faster) |"] if "base" in med else []),
        f"| `xargs -P {PAR} curl` + awk relabelling (reference) | {ref:.3f} | 1.00x |",
        f"| `curl --unix-socket` loop + awk relabelling (serial, for comparison) | {med['loop']:.3f} | "
        f"{med['loop'] / ref:.2f}x (katactl {med['loop'] / med['katactl']:.1f}x faster than it) |",
        "",
        f"**Goal (issue 15): >= {GOAL:g}x faster than the same-concurrency reference: {verdict}** "
        f"({speedup:.1f}x in this run).",
    ]) + "\n"
    publish(text, "bench/bench_metrics.py", a.write)


if __name__ == "__main__":
    main()
