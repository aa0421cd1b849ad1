#!/usr/bin/env python3
"""Print every metric name (guard_* and up) that alerts.yml and dashboard.json use.

One name per line, sorted, no duplicates. Histogram series (_bucket, _sum,
_count) are printed as the histogram's base name, e.g.
guard_block_latency_seconds_bucket -> guard_block_latency_seconds, so the
list can be compared with the names the agent and the app register.

Usage:
    metric_names.py                      # alerts.yml + dashboard.json next to this file
    metric_names.py FILE...              # *.json is read as a Grafana dashboard, anything
                                         # else as a Prometheus rule file
    metric_names.py --exprs FILE...      # print the PromQL expressions found instead

Only the standard library is used: rule files are read with a line-based
scan of `expr:` fields (inline, quoted, or `|`/`>` block scalars), which is
all Prometheus rule files need. Exits 1 if a file yields no expression.
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FILES = [os.path.join(HERE, "alerts.yml"), os.path.join(HERE, "dashboard.json")]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_EXPR_KEY = re.compile(r"^(?P<indent>\s*)(?:-\s+)?expr:\s*(?P<rest>.*?)\s*$")


def _unquote_yaml_scalar(value):
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    return value


def rule_file_exprs(text):
    """The `expr:` values of a Prometheus rule file."""
    lines = text.splitlines()
    exprs = []
    i = 0
    while i < len(lines):
        m = _EXPR_KEY.match(lines[i])
        i += 1
        if not m:
            continue
        rest = m.group("rest")
        if rest[:1] in ("|", ">"):
            # Block scalar: every following line indented deeper than the key
            # (or blank) belongs to it.
            key_indent = len(m.group("indent"))
            body = []
            while i < len(lines):
                line = lines[i]
                if line.strip() and len(line) - len(line.lstrip()) <= key_indent:
                    break
                body.append(line.strip())
                i += 1
            exprs.append(" ".join(part for part in body if part))
        else:
            # Strip a trailing comment only outside quotes (PromQL has no '#').
            if rest[:1] not in ("'", '"'):
                rest = rest.split(" #", 1)[0].rstrip()
            exprs.append(_unquote_yaml_scalar(rest))
    return exprs


def dashboard_exprs(dashboard):
    """PromQL of a Grafana dashboard: panel targets, annotation queries and
    template variable queries (label_values(metric, label) and friends)."""
    exprs = []

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key == "expr":
            exprs.append(node)

    walk(dashboard)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query.strip():
            exprs.append(query)
    return exprs


def file_exprs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        exprs = dashboard_exprs(json.loads(text))
    else:
        exprs = rule_file_exprs(text)
    if not exprs:
        raise SystemExit(f"metric_names.py: no expressions found in {path}")
    return exprs


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr):
    """Metric names guard_* and up in one PromQL expression."""
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)  # Grafana variables such as $guard_job
    text = _MATCHERS.sub(" ", text)  # label names inside {...}
    text = _LABEL_LISTS.sub(" ", text)  # label names in by (...), on (...)
    names = set()
    for token in _IDENT.findall(text):
        if token == "up":
            names.add(token)
        elif token.startswith("guard_"):
            for suffix in HISTOGRAM_SUFFIXES:
                if token.endswith(suffix):
                    token = token[: -len(suffix)]
                    break
            names.add(token)
    return names


def main(argv):
    show_exprs = False
    if argv and argv[0] == "--exprs":
        show_exprs = True
        argv = argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    files = argv or DEFAULT_FILES
    if show_exprs:
        for path in files:
            for expr in file_exprs(path):
                print(" ".join(expr.split()))
        return 0
    names = set()
    for path in files:
        for expr in file_exprs(path):
            names |= metric_names(expr)
    for name in sorted(names):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
