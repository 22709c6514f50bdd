#!/usr/bin/env python3
"""Offline checks of everything under deploy/ (run by deploy/validate.sh, which installs the tools).

1. Renders deploy/k8s/base, every overlay in deploy/k8s/overlays/ and every component in
   deploy/k8s/components/ (applied on top of the single-node overlay) with `kubectl kustomize`,
   and reads the plain manifests in deploy/k8s/examples/.
2. Validates every object: core kinds against the Kubernetes JSON schemas bundled in the
   kubernetes-validate package (strict: unknown fields fail), for the oldest and the newest
   Kubernetes version in K8S_VERSIONS; ServiceMonitor and PodMonitor against the strict subset
   schemas in deploy/k8s/schemas/. A kind with no schema fails: nothing is skipped.
3. Cross-checks the objects: Services, probes, ServiceMonitor/PodMonitor and envFrom/volume
   references resolve; worker replicas equal TESSERA_TP; the dashboard ConfigMap is
   byte-identical to deploy/grafana/tessera.json; every tessera flag in container args and every
   TESSERA_* key in the ConfigMap exists in `tessera <subcommand> --help` (with --tessera-bin).
4. Checks the Grafana dashboard: every query uses only metric names from common/src/metrics.rs,
   filters coordinator metrics by model=~"$model" and worker metrics by instance=~"$instance",
   and uses [$__rate_interval] for every range; with promtool on PATH, every query must parse.
5. Lints deploy/docker/Dockerfile with hadolint (when on PATH).

Prints one line per problem and exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "tessera.json"
METRICS_RS = ROOT / "common" / "src" / "metrics.rs"
# Oldest Kubernetes the manifests target (grpc probes GA, nodeTaintsPolicy beta: 1.27+) and the
# newest the installed kubernetes-validate knows.
MIN_K8S = "1.29"
IMAGE = "ghcr.io/tessera-project/tessera"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): K8S / "schemas" / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): K8S / "schemas" / "podmonitor-monitoring-v1.json",
}

problems: list[str] = []


def problem(where: str, msg: str) -> None:
    problems.append(f"{where}: {msg}")
    print(f"FAIL {where}: {msg}")


_notes: set[str] = set()


def note(msg: str) -> None:
    if msg not in _notes:
        _notes.add(msg)
        print(f"note: {msg}")


# ---- rendering --------------------------------------------------------------------------------


def kubectl() -> str:
    exe = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not exe:
        sys.exit("kubectl not found (deploy/validate.sh installs it)")
    return exe


def render(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        problem(str(path.relative_to(ROOT)), f"kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def targets() -> list[tuple[str, list[dict]]]:
    """(name, objects) for the base, each overlay, each component and the examples."""
    result = [("base", render(K8S / "base"))]
    for overlay in sorted((K8S / "overlays").iterdir()):
        if (overlay / "kustomization.yaml").exists():
            result.append((f"overlays/{overlay.name}", render(overlay)))
    components = K8S / "components"
    for comp in sorted(components.iterdir()) if components.is_dir() else []:
        if not (comp / "kustomization.yaml").exists():
            continue
        # A component only renders inside a kustomization: apply it to the single-node overlay,
        # from a temporary folder (kustomize takes relative paths only).
        with tempfile.TemporaryDirectory() as tmp:
            rel = os.path.relpath(K8S, tmp)
            Path(tmp, "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {rel}/overlays/single-node-8gpu\n"
                f"components:\n  - {rel}/components/{comp.name}\n"
            )
            result.append((f"overlays/single-node-8gpu + components/{comp.name}", render(Path(tmp))))
    examples = K8S / "examples"
    for f in sorted(examples.glob("*.yaml")) if examples.is_dir() else []:
        result.append((f"examples/{f.name}", [d for d in yaml.safe_load_all(f.read_text()) if d]))
    return result


def context_of(name: str, rendered: dict[str, list[dict]]) -> list[dict]:
    """Objects a target is applied beside and may refer to: an example goes next to the base's
    ConfigMaps and volumes (only lookups: the base's own objects are checked on their own)."""
    if not name.startswith("examples/"):
        return []
    return [o for o in rendered["base"] if o.get("kind") in ("ConfigMap", "PersistentVolumeClaim", "Namespace")]


# ---- schemas ----------------------------------------------------------------------------------


def validate_schema(where: str, obj: dict, versions: list[str]) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        validator = jsonschema.Draft202012Validator(schema)
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = "/".join(str(p) for p in err.absolute_path)
            problem(where, f"{path or '(root)'}: {err.message}")
        return
    for version in versions:
        errors = k8s_errors(obj, version)
        if errors is None:
            problem(where, f"no schema for {key[0]} {key[1]} (Kubernetes {version}, nor vendored)")
            return
        for err in errors:
            path = "/".join(str(p) for p in err.absolute_path)
            problem(where, f"Kubernetes {version}: {path or '(root)'}: {err.message}")
        if errors:
            return


def k8s_errors(obj: dict, version: str) -> list | None:
    """Every error of obj against kubernetes-validate's strict schema for its kind (the
    package's own validate() stops at the first), or None when it has no such schema."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return []
    except kubernetes_validate.SchemaNotFoundError:
        return None
    except kubernetes_validate.ValidationError:
        pass
    schema_version = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]
    schema_dir = f"kubernetes-json-schema/v{schema_version}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    schema = utils.schema_contents(f"{schema_dir}/{obj['kind'].lower()}-{api}.json", version)
    defs = utils.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])


# ---- cross-checks -----------------------------------------------------------------------------


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def help_flags(tessera_bin: str | None) -> dict[str, tuple[set[str], set[str]]]:
    """subcommand -> (flags, env vars) from `tessera <sub> --help`."""
    if not tessera_bin:
        return {}
    found = {}
    for sub in ("coordinator", "worker", "serve"):
        out = subprocess.run([tessera_bin, sub, "--help"], capture_output=True, text=True)
        if out.returncode != 0:
            problem("tessera", f"`{tessera_bin} {sub} --help` failed: {out.stderr.strip()}")
            continue
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", out.stdout, re.M))
        envs = set(re.findall(r"\[env: ([A-Z0-9_]+)=", out.stdout))
        found[sub] = (flags, envs)
    return found


def cross_check(name: str, objs: list[dict], cli: dict) -> None:
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmaps = by_kind.get("ConfigMap", {})
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    workloads = [o for o in objs if pod_spec(o) is not None]

    def where(o: dict) -> str:
        return f"{name}: {name_of(o)}"

    for o in workloads:
        spec = pod_spec(o)
        if o["kind"] in ("Deployment", "StatefulSet"):
            sel = o["spec"]["selector"].get("matchLabels", {})
            if not matches(sel, pod_labels(o)):
                problem(where(o), "selector does not match the pod template's labels")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_kind)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = probe.get(handler, {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        problem(where(o), f"{c['name']}.{probe_kind} uses port {port!r}, not a container port")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                if cm and cm not in configmaps and not ref["configMapRef"].get("optional"):
                    problem(where(o), f"{c['name']} envFrom ConfigMap {cm!r} is not in the rendering")
            mounts = {v["name"] for v in spec.get("volumes", [])}
            for m in c.get("volumeMounts", []):
                templates = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])}
                if m["name"] not in mounts | templates:
                    problem(where(o), f"{c['name']} mounts undefined volume {m['name']!r}")
            if c.get("image", "").split(":")[0] == IMAGE:
                check_tessera_args(where(o), c, cli)
        for v in spec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in pvcs:
                problem(where(o), f"volume {v['name']!r} claims PVC {claim!r}, not in the rendering")

    for svc in by_kind.get("Service", {}).values():
        sel = svc["spec"].get("selector")
        if not sel:
            continue
        pods = [o for o in workloads if matches(sel, pod_labels(o))]
        if not pods:
            problem(where(svc), f"selector {sel} matches no workload")
            continue
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for o in pods:
                names = {cp.get("name") for c in pod_spec(o)["containers"] for cp in c.get("ports", [])}
                nums = {cp["containerPort"] for c in pod_spec(o)["containers"] for cp in c.get("ports", [])}
                if tp not in names and tp not in nums:
                    problem(where(svc), f"port {p.get('name')} targets {tp!r}, not a port of {name_of(o)}")

    for sm in by_kind.get("ServiceMonitor", {}).values():
        sel = sm["spec"]["selector"].get("matchLabels", {})
        svcs = [s for s in by_kind.get("Service", {}).values() if matches(sel, s["metadata"].get("labels", {}))]
        if not svcs:
            problem(where(sm), f"selector {sel} matches no Service's labels")
        for ep in sm["spec"]["endpoints"]:
            for s in svcs:
                if ep["port"] not in {p.get("name") for p in s["spec"]["ports"]}:
                    problem(where(sm), f"endpoint port {ep['port']!r} is not a named port of {name_of(s)}")
    for pm in by_kind.get("PodMonitor", {}).values():
        sel = pm["spec"]["selector"].get("matchLabels", {})
        pods = [o for o in workloads if matches(sel, pod_labels(o))]
        if not pods:
            problem(where(pm), f"selector {sel} matches no workload's pods")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            for o in pods:
                names = {cp.get("name") for c in pod_spec(o)["containers"] for cp in c.get("ports", [])}
                if ep["port"] not in names:
                    problem(where(pm), f"endpoint port {ep['port']!r} is not a named port of {name_of(o)}")

    # The worker group: the coordinator waits for TESSERA_TP workers.
    workers = [o for o in workloads if pod_labels(o).get("app.kubernetes.io/component") == "worker"]
    for w in workers:
        env = {}
        for c in pod_spec(w)["containers"]:
            for ref in c.get("envFrom", []):
                env.update(configmaps.get(ref.get("configMapRef", {}).get("name"), {}).get("data", {}))
        tp = env.get("TESSERA_TP")
        if tp is None:
            problem(where(w), "no TESSERA_TP in the ConfigMaps it reads")
        elif int(tp) != w["spec"].get("replicas", 1):
            problem(where(w), f"replicas {w['spec'].get('replicas', 1)} but TESSERA_TP={tp}")

    # Settings: every TESSERA_* key must be an env var some subcommand reads.
    if cli:
        known_env = set().union(*(envs for _, envs in cli.values()))
        for cm in configmaps.values():
            for key in cm.get("data", {}):
                if key.startswith("TESSERA_") and key not in known_env:
                    problem(where(cm), f"{key} is not an env var of tessera coordinator/worker/serve")

    # The dashboard ConfigMap must carry deploy/grafana/tessera.json as it is.
    dashboards = [cm for cm in configmaps.values() if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if name.startswith(("base", "overlays")):
        if len(dashboards) != 1:
            problem(name, f"expected one ConfigMap labelled grafana_dashboard=1, found {len(dashboards)}")
        for cm in dashboards:
            if cm.get("data", {}).get("tessera.json") != DASHBOARD.read_text():
                problem(where(cm), "tessera.json differs from deploy/grafana/tessera.json")


def check_tessera_args(where: str, c: dict, cli: dict) -> None:
    args = list(c.get("command", [])[1:]) + list(c.get("args", []))
    if not args:
        problem(where, f"container {c['name']}: no tessera subcommand in args")
        return
    sub = args[0]
    if sub not in ("coordinator", "worker", "serve", "generate", "bench", "placement"):
        problem(where, f"container {c['name']}: unknown subcommand {sub!r}")
        return
    if not cli:
        return
    flags = cli.get(sub, (set(), set()))[0]
    for a in args[1:]:
        if not a.startswith("--"):
            continue
        flag = a.split("=", 1)[0]
        if flag in flags:
            continue
        problem(where, f"container {c['name']}: `tessera {sub}` has no flag {flag}")


# ---- dashboard --------------------------------------------------------------------------------


def metric_names() -> tuple[set[str], set[str], set[str]]:
    """(coordinator, worker, histogram) metric names from common/src/metrics.rs, whose doc
    comments start with the metric's type."""
    text = METRICS_RS.read_text()
    names, histograms = set(), set()
    for kind, name in re.findall(
        r'/// (\w+):[^\n]*\n(?:///[^\n]*\n)*pub const [A-Z0-9_]+: &str = "(tessera_[a-z0-9_]+)";', text
    ):
        names.add(name)
        if kind == "Histogram":
            histograms.add(name)
    worker = {n for n in names if n.startswith("tessera_worker_")}
    return names - worker, worker, histograms


def series_base(metric: str, histograms: set[str]) -> tuple[str | None, str]:
    """The metric a series name belongs to, or None with the reason it is not a series."""
    for suffix in ("_bucket", "_sum", "_count"):
        if metric.endswith(suffix) and metric[: -len(suffix)] in histograms:
            return metric[: -len(suffix)], ""
    if metric in histograms:
        return None, f"{metric} is a histogram: only its _bucket, _sum and _count series exist"
    return metric, ""


def check_dashboard() -> None:
    where = "deploy/grafana/tessera.json"
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        problem(where, f"not valid JSON: {e}")
        return
    coord, worker, histograms = metric_names()
    if not coord or not worker or not histograms:
        problem(str(METRICS_RS.relative_to(ROOT)), "found no metric name constants")
        return
    if dash.get("schemaVersion", 0) < 36:
        problem(where, f"schemaVersion {dash.get('schemaVersion')} is older than Grafana 9/10's")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    for v in ("datasource", "model", "instance"):
        if v not in variables:
            problem(where, f"no template variable {v!r}")
    exprs = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            if p.get("type") == "row":
                continue
            if not p.get("targets"):
                problem(where, f"panel {p.get('title')!r} has no query")
            for t in p.get("targets", []):
                exprs.append((p.get("title"), t.get("expr", "")))
                if t.get("datasource", {}).get("uid") != "${datasource}":
                    problem(where, f"panel {p.get('title')!r}: query not on the $datasource variable")

    walk(dash.get("panels", []))
    for title, expr in exprs:
        w = f"{where}: panel {title!r}"
        if not expr:
            problem(w, "empty expr")
            continue
        for m in re.finditer(r"\b(tessera_[a-z0-9_]+)\s*(\{[^}]*\})?", expr):
            metric, sel = m.group(1), m.group(2) or ""
            base, why = series_base(metric, histograms)
            if base is None:
                problem(w, why)
                continue
            if base not in coord | worker:
                problem(w, f"unknown metric {metric} (not in common/src/metrics.rs)")
                continue
            need = 'instance=~"$instance"' if base in worker else 'model=~"$model"'
            if need not in sel:
                problem(w, f"{metric} is not filtered by {need}")
        for window in re.findall(r"\[([^\]]*)\]", expr):
            if window != "$__rate_interval":
                problem(w, f"range [{window}] should be [$__rate_interval]")
    for name in ("model", "instance"):
        q = variables.get(name, {}).get("definition", "")
        m = re.match(r"label_values\((tessera_[a-z0-9_]+), (\w+)\)", q)
        if not m or m.group(2) != name:
            problem(where, f"variable {name}: query {q!r} is not label_values(<metric>, {name})")
        else:
            base, why = series_base(m.group(1), histograms)
            if base is None:
                problem(where, f"variable {name}: {why}")
            elif base not in coord | worker:
                problem(where, f"variable {name}: unknown metric {m.group(1)}")

    promtool = shutil.which("promtool")
    if not promtool:
        note("promtool not on PATH: dashboard queries not parsed (install Debian's prometheus to check them)")
        return
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"tessera:dashboard_query_{i}", "expr": expr.replace("$model", ".*")
         .replace("$instance", ".*").replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    out = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        problem(where, f"promtool rejects a query: {out.stdout.strip()} {out.stderr.strip()}")
    else:
        print(f"ok   {len(exprs)} dashboard queries parse (promtool)")


# ---- Dockerfile -------------------------------------------------------------------------------


def check_dockerfile() -> None:
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    hadolint = shutil.which("hadolint")
    if not hadolint:
        note("hadolint not on PATH: Dockerfile not linted")
        return
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    if out.returncode != 0:
        problem(str(dockerfile.relative_to(ROOT)), f"hadolint:\n{out.stdout}{out.stderr}")
    else:
        print("ok   deploy/docker/Dockerfile (hadolint)")
    # The image's features must exist in the root Cargo.toml.
    cargo = (ROOT / "Cargo.toml").read_text()
    features = re.search(r"^\[features\]\n(.*?)(?=^\[)", cargo, re.M | re.S)
    declared = set(re.findall(r"^([a-z0-9_-]+)\s*=", features.group(1), re.M)) if features else set()
    for feats in re.findall(r"--features[ =]([a-z0-9_,-]+)", dockerfile.read_text()):
        for f in feats.split(","):
            if f not in declared:
                problem(str(dockerfile.relative_to(ROOT)), f"feature {f!r} is not in Cargo.toml's [features]")


# ---- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tessera-bin", help="a tessera binary whose --help the manifests' flags are checked against")
    args = ap.parse_args()

    newest = kubernetes_validate.latest_version()
    versions = [MIN_K8S, newest]
    cli = help_flags(args.tessera_bin)
    if not cli:
        note("no --tessera-bin: flags and TESSERA_* settings not checked against `tessera --help`")
    all_targets = targets()
    rendered = dict(all_targets)
    for name, objs in all_targets:
        before = len(problems)
        if not objs:
            problem(name, "rendered no objects")
            continue
        for o in objs:
            if not isinstance(o, dict) or "kind" not in o or "metadata" not in o:
                problem(name, f"not a Kubernetes object: {str(o)[:80]}")
                continue
            validate_schema(f"{name}: {name_of(o)}", o, versions)
        try:
            cross_check(name, objs + context_of(name, rendered), cli)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            problem(name, f"cross-checks could not read the objects ({type(e).__name__}: {e})")
        if len(problems) == before:
            kinds = sorted({o["kind"] for o in objs})
            print(f"ok   {name}: {len(objs)} objects valid (Kubernetes {MIN_K8S} and {newest}; {', '.join(kinds)})")
    before = len(problems)
    check_dashboard()
    if len(problems) == before:
        print("ok   deploy/grafana/tessera.json: metric names, label filters and ranges")
    check_dockerfile()
    if problems:
        print(f"{len(problems)} problem(s) in deploy/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
