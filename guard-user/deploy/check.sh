#!/usr/bin/env bash
# Checks the operations material in this folder. Exits non-zero on the first
# class of failure it finds, after running every check.
#
#   promtool check rules alerts.yml          rule syntax and templates
#   promtool test rules alerts.test.yml      alert unit tests
#   every alert in alerts.yml has a test     (alertname in alerts.test.yml)
#   every runbook_url anchor exists          (headings of RUNBOOK.md)
#   python3 -m json.tool dashboard.json      valid JSON
#   dashboard PromQL parses                  (promtool, Grafana variables replaced)
#   metric_names.py runs                     (the Rust tests use its output)
#   guard.toml parses                        (python3 tomllib, Python >= 3.11)
#   k8s-sidecar.yaml has the expected kinds  (PyYAML, if installed), and its
#     ConfigMap guard.toml uses only documented keys
#   systemd-analyze verify guard.service     (if systemd-analyze exists)
#
# Needs: bash, python3, promtool (Debian: apt-get install -y prometheus).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")" || exit 2

if ! command -v python3 >/dev/null 2>&1; then
    echo "check.sh: python3 not found" >&2
    exit 2
fi
if ! command -v promtool >/dev/null 2>&1; then
    cat >&2 <<'EOF'
check.sh: promtool not found. It comes with Prometheus:
  Debian/Ubuntu:  apt-get install -y prometheus   (ships /usr/bin/promtool)
  other:          the promtool binary from a Prometheus release tarball, on PATH
EOF
    exit 2
fi

failures=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() {
    local name=$1
    shift
    if "$@" >"$tmp/out" 2>&1; then
        printf 'ok    %s\n' "$name"
    else
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$tmp/out"
        failures=$((failures + 1))
    fi
}

skip() {
    printf 'skip  %s\n' "$1"
}

step "promtool check rules alerts.yml" promtool check rules alerts.yml
step "promtool test rules alerts.test.yml" promtool test rules alerts.test.yml

step "every alert has a unit test" python3 - <<'EOF'
import re, sys
alerts = re.findall(r"^\s*-\s+alert:\s*(\S+)", open("alerts.yml").read(), re.M)
tested = set(re.findall(r"^\s*alertname:\s*(\S+)", open("alerts.test.yml").read(), re.M))
missing = [a for a in alerts if a not in tested]
if not alerts:
    sys.exit("no alerts found in alerts.yml")
if missing:
    sys.exit("alerts without a test in alerts.test.yml: " + ", ".join(missing))
unknown = sorted(tested - set(alerts))
if unknown:
    sys.exit("alerts.test.yml tests alerts that do not exist: " + ", ".join(unknown))
EOF

step "every runbook anchor exists in RUNBOOK.md" python3 - <<'EOF'
import json, re, sys
def slug(heading):
    # GitHub's heading anchors: lower case, drop punctuation, spaces to '-'.
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")
text = open("RUNBOOK.md", encoding="utf-8").read()
anchors = {slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
refs = re.findall(r"RUNBOOK\.md#([\w-]+)", open("alerts.yml").read())
refs += re.findall(r"\]\(#([\w-]+)\)", text)
refs += re.findall(r"RUNBOOK\.md#([\w-]+)", json.dumps(json.load(open("dashboard.json"))))
urls = re.findall(r"^\s*runbook_url:", open("alerts.yml").read(), re.M)
alerts = re.findall(r"^\s*-\s+alert:", open("alerts.yml").read(), re.M)
if len(urls) != len(alerts):
    sys.exit(f"{len(alerts)} alerts but {len(urls)} runbook_url annotations")
missing = sorted({r for r in refs if r not in anchors})
if missing:
    sys.exit("anchors not found in RUNBOOK.md: " + ", ".join(missing))
EOF

step "python3 -m json.tool dashboard.json" python3 -m json.tool dashboard.json

# Grafana variables are not PromQL: replace them, then let promtool parse each
# expression as a recording rule.
step "dashboard PromQL parses (promtool)" bash -c '
python3 - "$1" <<"EOF" || exit 1
import json, sys
sys.path.insert(0, ".")
import metric_names
exprs = metric_names.dashboard_exprs(json.load(open("dashboard.json")))
subs = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
        "$guard_job": "guard", "$app_job": "app", "$app_instance": ".*", "$instance": ".*"}
out = ["groups:", "  - name: dashboard", "    rules:"]
for i, e in enumerate(exprs):
    if e.startswith("label_values("):
        # label_values(metric{...}, label) is a Grafana function; check its selector.
        e = e[len("label_values("):].rsplit(",", 1)[0]
    for k in sorted(subs, key=len, reverse=True):
        e = e.replace(k, subs[k])
    out += [f"      - record: dashboard:expr{i}", "        expr: " + json.dumps(e)]
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
promtool check rules "$1"
' _ "$tmp/dashboard-rules.yml"

step "every dashboard panel uses \${DS_PROMETHEUS} and ids are unique" python3 - <<'EOF'
import json, sys
d = json.load(open("dashboard.json"))
if not any(i.get("name") == "DS_PROMETHEUS" for i in d.get("__inputs", [])):
    sys.exit("no DS_PROMETHEUS input")
ids, bad = [], []
for p in d["panels"]:
    ids.append(p["id"])
    if p["type"] != "row":
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            bad.append(p["title"])
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                bad.append(p["title"] + " / " + t.get("refId", "?"))
if len(ids) != len(set(ids)):
    sys.exit("duplicate panel ids")
if bad:
    sys.exit("panels not on ${DS_PROMETHEUS}: " + ", ".join(bad))
EOF

step "metric_names.py lists guard_* metrics and up" bash -c '
out=$(python3 metric_names.py) || exit 1
echo "$out" | grep -qx up || { echo "up missing"; exit 1; }
echo "$out" | grep -qx guard_block_latency_seconds || { echo "histogram base name missing"; exit 1; }
bad=$(echo "$out" | grep -vE "^(up|guard_[a-z0-9_]+)$" || true)
[ -z "$bad" ] || { echo "unexpected names: $bad"; exit 1; }
'

if python3 -c 'import tomllib' 2>/dev/null; then
    step "guard.toml parses" python3 -c 'import tomllib; tomllib.load(open("guard.toml", "rb"))'
else
    skip "guard.toml parses (needs Python >= 3.11 for tomllib)"
fi

if python3 -c 'import yaml' 2>/dev/null; then
    step "k8s-sidecar.yaml parses" python3 - <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("k8s-sidecar.yaml")) if d]
kinds = sorted(d["kind"] for d in docs)
if "Deployment" not in kinds or "ConfigMap" not in kinds:
    sys.exit(f"expected a Deployment and a ConfigMap, got {kinds}")
# The ConfigMap's guard.toml must parse and use only keys the sample documents.
try:
    import tomllib
except ImportError:
    sys.exit(0)
def keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys(v, prefix + k + ".")
    return out
sample = keys(tomllib.load(open("guard.toml", "rb")))
for d in docs:
    if d["kind"] == "ConfigMap" and "guard.toml" in d.get("data", {}):
        unknown = keys(tomllib.loads(d["data"]["guard.toml"])) - sample
        if unknown:
            sys.exit("ConfigMap guard.toml has keys guard.toml does not document: " + ", ".join(sorted(unknown)))
EOF
else
    skip "k8s-sidecar.yaml parses (needs PyYAML)"
fi

if command -v systemd-analyze >/dev/null 2>&1; then
    # The binary is not installed here: verify the unit with a stand-in.
    sed 's#^ExecStart=.*#ExecStart=/bin/true#' guard.service >"$tmp/guard.service"
    step "systemd-analyze verify guard.service" systemd-analyze verify --man=no "$tmp/guard.service"
else
    skip "systemd-analyze verify guard.service (no systemd-analyze)"
fi

if [ "$failures" -ne 0 ]; then
    echo "check.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "check.sh: all checks passed"
