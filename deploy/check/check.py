"""Checks deploy/: the Kubernetes manifests render and validate, the compose file validates
against the Compose specification, and what they name exists in the code.

Run by deploy/check/run (which installs the pinned tools into .tools/deploy-venv). What it does:

- Renders deploy/kubernetes/base and overlays/production with a small renderer of the kustomize
  features they use (no kustomize binary installs from the registries this project uses):
  `resources` (files and directories with a kustomization.yaml), `namespace`, `labels` (pairs,
  includeSelectors, includeTemplates), `images` (newName, newTag), `configMapGenerator` (files,
  with generatorOptions.disableNameSuffixHash) and `patches` with JSON 6902 operations (add,
  replace, remove) and a target of kind, group and name (a regular expression, as kustomize's).
  Anything else in a kustomization is an error here, not silently ignored.
- Validates every rendered built-in resource strictly against the Kubernetes schemas that PyPI
  kubernetes-validate ships. cert-manager Certificates and CloudNativePG Clusters and Databases
  are not in those schemas: they are checked against the required fields written below (their
  apiVersion and kind, and the fields their operators need), not their full CRD schemas.
- Validates deploy/compose/compose.yaml against the Compose specification's JSON schema, as
  check-jsonschema ships it (vendor.compose-spec).
- Cross-checks: every container runs the image the Containerfile builds, `serve <service>
  --config <file>` of a service the binary has with a file its ConfigMap holds; container ports
  are the config's [server] listen and [admin] listen; probes are /healthz and /readyz on the
  admin port; every file path the config names lies under a mount; every ONESTOP__ variable names
  a key path (the Rust test cli/tests/deploy.rs loads them with the real configuration types).
"""

import copy
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
SERVICES = {"gateway": 7443, "forms": 7101, "identity": 7102, "routing": 7103, "eaddress": 7104}
ADMIN_PATHS = {"/healthz", "/readyz", "/metrics"}
failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


# ---- the renderer ------------------------------------------------------------------------------

KNOWN = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "generatorOptions",
         "configMapGenerator", "patches"}


def render(directory):
    directory = pathlib.Path(directory)
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    if unknown:
        raise SystemExit(f"{directory}: kustomize features this renderer lacks: {sorted(unknown)}")
    docs = []
    for entry in k.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    no_hash = k.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    for gen in k.get("configMapGenerator", []):
        if not no_hash or set(gen) - {"name", "files"}:
            raise SystemExit(f"{directory}: configMapGenerator beyond name/files without hash")
        data = {}
        for f in gen["files"]:
            data[pathlib.Path(f).name] = (directory / f).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                     "data": data})
    for patch in k.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        matched = 0
        for d in docs:
            group = d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else ""
            if target.get("kind", d["kind"]) != d["kind"] or target.get("group", group) != group:
                continue
            if "name" in target and not re.fullmatch(target["name"], d["metadata"]["name"]):
                continue
            for op in ops:
                json6902(d, op)
            matched += 1
        if not matched:
            raise SystemExit(f"{directory}: patch matches nothing: {target}")
    if "namespace" in k:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
            template = d.get("spec", {}).get("template") if d["kind"] in (
                "Deployment", "StatefulSet", "DaemonSet", "Job") else None
            if label.get("includeTemplates") and template:
                template["metadata"].setdefault("labels", {}).update(label["pairs"])
            if label.get("includeSelectors"):
                raise SystemExit("labels with includeSelectors: not supported by this renderer")
    for image in k.get("images", []):
        for d in docs:
            for c in containers(d):
                name, _, _ = c["image"].partition(":")
                if name == image["name"] or name == image.get("_renamed"):
                    c["image"] = f'{image.get("newName", name)}:{image["newTag"]}'
    return docs


def json6902(doc, op):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op["op"] == "add":
            parent.insert(index, op["value"])
        elif op["op"] == "replace":
            parent[index] = op["value"]
        elif op["op"] == "remove":
            del parent[index]
        else:
            raise SystemExit(f"JSON 6902 op not supported: {op['op']}")
    else:
        if op["op"] in ("replace", "remove") and last not in parent:
            raise SystemExit(f"JSON 6902 {op['op']} of a missing path {op['path']}")
        if op["op"] in ("add", "replace"):
            parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[last]
        else:
            raise SystemExit(f"JSON 6902 op not supported: {op['op']}")


def containers(d):
    spec = d.get("spec", {}).get("template", {}).get("spec", {}) if d.get("kind") == "Deployment" else {}
    return spec.get("containers", []) + spec.get("initContainers", [])


# ---- the resources outside the Kubernetes schemas ------------------------------------------------

def require(doc, paths, where):
    for path in paths:
        node = doc
        for p in path.split("."):
            if not isinstance(node, dict) or p not in node:
                fail(f"{where}: {path} is required")
                break
            node = node[p]


CRDS = {
    ("cert-manager.io/v1", "Certificate"): ["spec.secretName", "spec.issuerRef.name"],
    ("postgresql.cnpg.io/v1", "Cluster"): ["spec.instances", "spec.storage.size"],
    ("postgresql.cnpg.io/v1", "Database"): ["spec.name", "spec.owner", "spec.cluster.name"],
}
CERTIFICATE_FIELDS = {"secretName", "issuerRef", "duration", "renewBefore", "privateKey", "usages",
                      "dnsNames", "uris", "commonName", "ipAddresses", "subject", "isCA"}
USAGES = {"server auth", "client auth", "digital signature", "key encipherment"}


def check_crd(d, where):
    key = (d["apiVersion"], d["kind"])
    require(d, ["metadata.name"] + CRDS[key], where)
    if d["kind"] == "Certificate":
        spec = d["spec"]
        if set(spec) - CERTIFICATE_FIELDS:
            fail(f"{where}: unknown Certificate fields {sorted(set(spec) - CERTIFICATE_FIELDS)}")
        if set(spec.get("usages", [])) - USAGES:
            fail(f"{where}: unknown usages")
        if not spec.get("dnsNames") and not spec.get("uris"):
            fail(f"{where}: a Certificate names nothing")
    if d["kind"] == "Cluster" and not isinstance(d["spec"]["instances"], int):
        fail(f"{where}: instances is an integer")


# ---- cross-checks against the code -------------------------------------------------------------

def containerfile():
    text = (DEPLOY / "image" / "Containerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["onestop"\]$', text, re.M), "Containerfile ENTRYPOINT"
    assert re.search(r"^USER 10001:10001$", text, re.M), "Containerfile USER"
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, re.M) for p in line.split()}
    return exposed


def served_services():
    """The services `onestop serve` runs, from the binary's own registry of them."""
    services = set(re.findall(r'^    name: "([a-z]+)",$', (ROOT / "cli" / "src" / "services.rs").read_text(), re.M))
    if re.search(r'GATEWAY: &str = "gateway"', (ROOT / "cli" / "src" / "federation.rs").read_text()):
        services.add("gateway")
    return services


def key_exists(config, path):
    node = config
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def cross_check(docs, where, exposed, served):
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    services = [d for d in docs if d["kind"] == "Service"]
    seen = set()
    for d in docs:
        for c in containers(d):
            w = f'{where}: {d["metadata"]["name"]}/{c["name"]}'
            if not re.fullmatch(r"[a-z0-9./-]+/onestop:[0-9A-Za-z._-]+", c["image"]):
                fail(f"{w}: image {c['image']} is not the onestop image")
            args = c.get("args", [])
            if len(args) != 4 or args[0] != "serve" or args[2] != "--config" or args[1] not in served:
                fail(f"{w}: args {args} are not `serve <service> --config <file>`")
                continue
            name, config_path = args[1], args[3]
            seen.add(name)
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            config = None
            for m in mounts.values():
                v = volumes[m["name"]]
                if "configMap" in v and config_path.startswith(m["mountPath"] + "/"):
                    cm = configmaps.get(v["configMap"]["name"])
                    file = config_path[len(m["mountPath"]) + 1:]
                    if cm and file in cm["data"]:
                        config = tomllib.loads(cm["data"][file])
            if config is None:
                fail(f"{w}: {config_path} is in no ConfigMap mounted there")
                continue
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            if ports.get("grpc") != port_of(config["server"]["listen"]) or ports["grpc"] != SERVICES[name]:
                fail(f"{w}: grpc port {ports.get('grpc')} is not [server] listen")
            admin = config.get("admin", {}).get("listen")
            if admin is None or ports.get("admin") != port_of(admin):
                fail(f"{w}: admin port {ports.get('admin')} is not [admin] listen {admin}")
            if not set(ports.values()) <= exposed:
                fail(f"{w}: ports {ports} not all EXPOSEd by the Containerfile")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                                ("startupProbe", "/healthz")):
                get = c.get(probe, {}).get("httpGet")
                if not get or get["path"] != path or get["port"] not in ("admin", ports.get("admin")):
                    fail(f"{w}: {probe} is not {path} on the admin port")
            annotations = d["spec"]["template"]["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/path", "/metrics") not in ADMIN_PATHS or \
                    int(annotations.get("prometheus.io/port", ports["admin"])) != ports["admin"]:
                fail(f"{w}: the scrape annotations are not the admin listener")
            for env in c.get("env", []):
                if env["name"].startswith("ONESTOP__"):
                    path = env["name"][len("ONESTOP__"):].lower().split("__")
                    # The real types decide in cli/tests/deploy.rs; here: it is a key the file sets.
                    if not key_exists(config, path):
                        fail(f"{w}: {env['name']} overrides no key of {config_path}")
                elif env["name"].startswith("ONESTOP"):
                    fail(f"{w}: {env['name']} looks like an override but is not one")
            security = c.get("securityContext", {})
            if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
                fail(f"{w}: not a read-only root filesystem without privilege escalation")
            pod_security = d["spec"]["template"]["spec"].get("securityContext", {})
            if pod_security.get("runAsUser") != 10001 or not pod_security.get("runAsNonRoot"):
                fail(f"{w}: not run as the image's user 10001")
            for file in config_files(config):
                if not any(file.startswith(m["mountPath"] + "/") or file == m["mountPath"]
                           for m in mounts.values()):
                    fail(f"{w}: {file} (named in {config_path}) is under no mount")
            for svc in services:
                if svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]:
                    for p in svc["spec"]["ports"]:
                        if p["targetPort"] not in ports:
                            fail(f'{w}: Service {svc["metadata"]["name"]} targets {p["targetPort"]}')
            if name == "gateway":
                for route in config["routes"].values():
                    for address in route["addresses"]:
                        host, port = address.rsplit(":", 1)
                        target = [s for s in services if s["metadata"]["name"] == host]
                        if not target or int(port) not in [p["port"] for p in target[0]["spec"]["ports"]]:
                            fail(f"{w}: route address {address} is no Service's port")
    if seen != set(SERVICES):
        fail(f"{where}: services without a Deployment: {sorted(set(SERVICES) - seen)}")


def config_files(config, key=""):
    """Every absolute path a configuration names."""
    if isinstance(config, dict):
        for k, v in config.items():
            yield from config_files(v, k)
    elif isinstance(config, list):
        for v in config:
            yield from config_files(v, key)
    elif isinstance(config, str) and config.startswith("/"):
        yield config


def check_kubernetes(exposed, served):
    for overlay in ("base", "overlays/production"):
        docs = render(DEPLOY / "kubernetes" / overlay)
        where = f"kubernetes/{overlay}"
        kinds = {}
        for d in docs:
            kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
            w = f'{where}: {d["kind"]} {d["metadata"]["name"]}'
            if (d["apiVersion"], d["kind"]) in CRDS:
                check_crd(d, w)
                continue
            try:
                kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{w}: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # an unknown kind, a version without schemas
                fail(f"{w}: {e}")
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Certificate"):
            for s in SERVICES:
                if f"onestop-{s}" not in kinds.get(kind, []):
                    fail(f"{where}: no {kind} onestop-{s}")
        for s in ("gateway", "forms", "routing"):
            if f"onestop-{s}" not in kinds.get("HorizontalPodAutoscaler", []):
                fail(f"{where}: no HorizontalPodAutoscaler onestop-{s}")
        if "Cluster" not in kinds:
            fail(f"{where}: no CloudNativePG Cluster")
        external = [d for d in docs if d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort")]
        if [d["metadata"]["name"] for d in external] != ["onestop-gateway"]:
            fail(f"{where}: reachable from outside: {[d['metadata']['name'] for d in external]}")
        cross_check(docs, where, exposed, served)
        print(f"ok {where}: {len(docs)} resources ({', '.join(f'{len(v)} {k}' for k, v in sorted(kinds.items()))})")


def check_compose(exposed, served):
    path = DEPLOY / "compose" / "compose.yaml"
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.compose-spec", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"compose: {result.stdout}{result.stderr}")
        return
    compose = yaml.safe_load(path.read_text())
    for name in SERVICES:
        service = compose["services"].get(name)
        if not service:
            fail(f"compose: no service {name}")
            continue
        command = service.get("command", [])
        if command[:2] != ["serve", name] or command[2] != "--config":
            fail(f"compose: {name} does not run `serve {name} --config`")
            continue
        config_path = command[3]
        source = None
        for v in service.get("volumes", []):
            host, _, target = v.partition(":")
            target = target.split(":")[0]
            if config_path.startswith(target + "/"):
                source = (path.parent / host / config_path[len(target) + 1:]).resolve()
            elif config_path == target:
                source = (path.parent / host).resolve()
        if not source or not source.exists():
            fail(f"compose: {name}'s {config_path} comes from no file")
            continue
        config = tomllib.loads(source.read_text())
        probe = re.search(r"/dev/tcp/127.0.0.1/(\d+) .*GET (/\w+) ", service["healthcheck"]["test"][-1])
        if not probe or int(probe[1]) != port_of(config["admin"]["listen"]) or probe[2] != "/readyz":
            fail(f"compose: {name}'s healthcheck is not /readyz on its admin port")
        if service.get("image") != "localhost/onestop:latest" or not service.get("read_only"):
            fail(f"compose: {name} is not the onestop image with a read-only root filesystem")
        for env in service.get("environment", {}):
            if env.startswith("ONESTOP__") and not key_exists(config, env[9:].lower().split("__")):
                fail(f"compose: {name}'s {env} overrides no key of {source.name}")
    rules = path.parent / "../prometheus"
    if not any(v.startswith("../prometheus:") for v in compose["services"]["prometheus"]["volumes"]):
        fail("compose: Prometheus is not given deploy/prometheus/ (the alert rules)")
    if not rules.is_dir():
        print("note: deploy/prometheus/ (the alert rules compose.yaml mounts) does not exist yet")
    print(f"ok compose: {path.relative_to(ROOT)} ({len(compose['services'])} services)")


def main():
    exposed = containerfile()
    served = served_services()
    check_kubernetes(exposed, served)
    check_compose(exposed, served)
    print(f"{0 if failures else 1} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
