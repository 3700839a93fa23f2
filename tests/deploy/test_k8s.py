"""deploy/k8s: both overlays render with kustomize, validate against a pinned Kubernetes API, and hang
together (selectors, ports, probes, volumes, the serve command line, the HPA's metrics and the
prometheus-adapter rules that make them)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import K8S, OVERLAYS, by_kind, kustomize, one

# Not the bare overlay name: a test id `gpu` would carry the `gpu` keyword, which conftest skips on CPU.
OVERLAY_IDS = [f"overlays-{name}" for name in OVERLAYS]

KUBERNETES_VERSION = "1.33.0"  # the API version the manifests are checked against
CRD_KINDS = {"ServiceMonitor"}  # not in the core schemas: checked field by field below
FETCH_SCRIPT = K8S / "components" / "model-store" / "fetch-model.sh"


def pod_spec(resources: list[dict]) -> dict:
    return one(resources, "Deployment")["spec"]["template"]["spec"]


def server(resources: list[dict]) -> dict:
    (container,) = [c for c in pod_spec(resources)["containers"] if c["name"] == "qserve"]
    return container


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_every_resource_validates_against_the_pinned_kubernetes_api(rendered, overlay):
    import kubernetes_validate

    kinds = set()
    for resource in rendered[overlay]:
        kinds.add(resource["kind"])
        if resource["kind"] in CRD_KINDS:
            continue
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    expected = {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Deployment", "Service",
                "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"}  # fmt: skip
    assert kinds == expected


def test_the_validator_rejects_a_wrong_field(rendered):
    import kubernetes_validate

    deployment = one(rendered["cpu"], "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_service_monitor_scrapes_the_service_metrics_port(rendered, overlay):
    resources = rendered[overlay]
    monitor, service = one(resources, "ServiceMonitor"), one(resources, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_service_pdb_and_hpa_point_at_the_deployment(rendered, overlay):
    resources = rendered[overlay]
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(resources, "Service")
    assert matches(service["spec"]["selector"], pod_labels)
    container_ports = {p["name"]: p["containerPort"] for p in server(resources)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(container_ports)
    pdb = one(resources, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = one(resources, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_probes_and_graceful_shutdown(rendered, overlay):
    spec = pod_spec(rendered[overlay])
    container = server(rendered[overlay])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # The liveness probe must not kill a replica that is still loading its model.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Grace = the preStop wait (endpoints removal reaching the proxies) + time to drain requests.
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 60


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_init_container_fetches_to_the_volume_the_server_reads(rendered, overlay):
    resources = rendered[overlay]
    spec = pod_spec(resources)
    (init,) = spec["initContainers"]
    container = server(resources)
    volumes = {v["name"]: v for v in spec["volumes"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    server_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert init_mounts["models"] == server_mounts["models"]
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    pvc = one(resources, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and "ReadWriteMany" in pvc["spec"]["accessModes"]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    server_env = {e["name"]: e["value"] for e in container["env"]}
    assert init_env["MODEL_NAME"] == server_env["MODEL_NAME"]
    assert init_env["MODELS_DIR"] == init_mounts["models"]
    # The script it runs is the one in the repository, mounted from the generated ConfigMap.
    script_volume = next(n for n, path in init_mounts.items() if init["command"][-1].startswith(path + "/"))
    config_map = next(
        c for c in by_kind(resources, "ConfigMap")
        if c["metadata"]["name"] == volumes[script_volume]["configMap"]["name"]
    )  # fmt: skip
    assert config_map["data"][Path(init["command"][-1]).name] == FETCH_SCRIPT.read_text()
    assert init["image"] == container["image"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_server_command_line_is_one_qserve_serve_accepts(rendered, overlay, tmp_path):
    """The container's args, with $(VAR)s expanded and the mounted config file, go through the real CLI
    parser and serve config: a misspelt flag or config key fails here, not in the cluster."""
    from qserve.commands.serve import build_config, serve

    resources = rendered[overlay]
    spec, container = pod_spec(resources), server(resources)
    env = {e["name"]: e["value"] for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert args[0] == "serve"
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:  # ConfigMap files, written where the args expect them
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        data = next(c for c in by_kind(resources, "ConfigMap") if c["metadata"]["name"] == source["name"])["data"]
        for key, text in data.items():
            local = tmp_path / key
            local.write_text(text)
            args = [a.replace(f"{mount['mountPath']}/{key}", str(local)) for a in args]
    ctx = serve.make_context("serve", args[1:])
    params = dict(ctx.params)
    model, config_file = params.pop("model"), params.pop("config_file")
    params["served_model_name"] = tuple(params["served_model_name"])
    cfg = build_config(ctx, model, config_file, params)
    assert cfg.host == "0.0.0.0"
    assert cfg.port == next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert cfg.model == f"/models/{env['MODEL_NAME']}"
    assert cfg.model_names == [env["SERVED_MODEL_NAME"]]
    assert cfg.device == overlay.replace("gpu", "cuda")
    # SIGTERM comes after preStop; the drain (--shutdown-timeout) and the engine's stop must end before
    # the kubelet's SIGKILL at terminationGracePeriodSeconds, or streams are cut without their end.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert cfg.shutdown_timeout >= 60  # LLM streams run for minutes; the 25 s default is for plain pods
    assert pre_stop + cfg.shutdown_timeout + 10 <= spec["terminationGracePeriodSeconds"]


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not(rendered):
    gpu, cpu = server(rendered["gpu"]), server(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith(":cuda") and cpu["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(rendered["gpu"])["tolerations"])


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]


def adapted_names(rule: dict) -> tuple[str, str]:
    """(Prometheus series name, custom metric name the adapter serves it as) for one adapter rule."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    # The adapter's `as` uses Go's ${1}; Python's re spells it \g<1>.
    served = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${", r"\g<").replace("}", ">"), series)
    return series, served


def test_adapter_rules_serve_every_hpa_metric(rendered):
    served = {adapted_names(rule)[1]: rule for rule in adapter_rules()}
    for overlay in OVERLAYS:
        hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            name = metric["pods"]["metric"]["name"]
            assert name in served, f"{overlay}: HPA metric {name} is served by no prometheus-adapter rule"
            rule = served[name]
            assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
            assert adapted_names(rule)[0] in rule["metricsQuery"]


def test_adapter_config_map_and_helm_values_carry_the_same_rules():
    (config_map,) = kustomize(K8S / "prometheus-adapter")
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["namespace"] == "monitoring"
    assert yaml.safe_load(config_map["data"]["config.yaml"])["rules"] == adapter_rules()
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["custom"] == adapter_rules()


def test_hpa_and_adapter_metrics_are_exposed_by_a_live_server(live_metrics):
    exposed = {line.split("{")[0].split(" ")[0] for line in live_metrics.splitlines() if line[:1].isalpha()}
    for rule in adapter_rules():
        series, _ = adapted_names(rule)
        assert series in exposed, f"{series} (prometheus-adapter rule) is not on a live server's /metrics"
        assert 'model_name="tiny"' in next(x for x in live_metrics.splitlines() if x.startswith(series + "{"))


# ---- the init container's script, run here on a tiny checkpoint ------------------------------------


def run_fetch(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os
    import sys

    bin_dir = Path(sys.executable).parent
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MODELS_DIR": str(tmp_path / "models"),
            "PYTHON": sys.executable, **env}  # fmt: skip
    return subprocess.run(["sh", str(FETCH_SCRIPT)], capture_output=True, text=True, env=full, timeout=120)


def test_fetch_script_validates_a_model_already_on_the_volume(tmp_path, tiny_llama_dir):
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path / "models" / "tiny")
    proc = run_fetch({"MODEL_SOURCE": "local", "MODEL_NAME": "tiny"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already present" in proc.stdout and "served unquantized" in proc.stdout
    proc = run_fetch({"MODEL_SOURCE": "local", "MODEL_NAME": "tiny", "ALLOW_UNQUANTIZED": "0"}, tmp_path)
    assert proc.returncode == 1 and "failed validation" in proc.stderr and "META_MISSING" in proc.stderr


def test_fetch_script_refuses_a_missing_model_or_a_bad_source(tmp_path):
    proc = run_fetch({"MODEL_SOURCE": "local", "MODEL_NAME": "absent"}, tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_fetch({"MODEL_SOURCE": "s3://bucket/model", "MODEL_NAME": "absent"}, tmp_path)
    assert proc.returncode == 2 and "is not one of" in proc.stderr
    proc = run_fetch({"MODEL_NAME": "absent"}, tmp_path)
    assert proc.returncode != 0 and "set MODEL_SOURCE" in proc.stderr


def test_fetch_script_downloads_beside_the_target_and_renames_it_into_place(tmp_path, tiny_llama_dir):
    """`embedded:` through a stand-in `qserve pull` that copies the tiny model (the real pull converts a
    100 MB GGUF); validation is the real `qserve validate`. A broken download never lands."""
    import sys

    real = Path(sys.executable).parent / "qserve"
    stub = tmp_path / "qserve-stub"
    stub.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = pull ]; then\n'
        f'  mkdir -p "$4" && cp -r {tiny_llama_dir}/. "$4/" && ls "$(dirname "$4")" > {tmp_path}/during\n'
        '  [ -z "$BREAK" ] || echo "not json" > "$4/config.json"\n'
        "  exit 0\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    stub.chmod(0o755)
    env = {"MODEL_SOURCE": "embedded:smollm2-135m", "MODEL_NAME": "m", "QSERVE": str(stub)}
    proc = run_fetch(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    during = (tmp_path / "during").read_text().split()
    assert len(during) == 1 and during[0].startswith("m.partial.")  # never a half-written `m`
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]
    assert (tmp_path / "models" / "m" / "config.json").is_file()
    proc = run_fetch({**env, "MODEL_NAME": "broken", "BREAK": "1"}, tmp_path)
    assert proc.returncode != 0 and "failed validation" in proc.stderr


# ---- KubeRay: the Ray Serve deployment as a RayService -------------------------------------------


@pytest.fixture(scope="module")
def kuberay() -> list[dict]:
    return kustomize(K8S / "kuberay")


def ray_pod_templates(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates |= {f"worker {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]}
    return templates


def test_kuberay_resources_and_pod_templates_validate(kuberay):
    import kubernetes_validate

    assert sorted(r["kind"] for r in kuberay) == ["ConfigMap", "Namespace", "PersistentVolumeClaim", "PodMonitor",
                                                  "RayService"]  # fmt: skip
    service = one(kuberay, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    for resource in kuberay:
        if resource["kind"] not in ("RayService", "PodMonitor"):  # CRDs: checked field by field
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    # The CRD's schema is KubeRay's; its pod templates are core PodTemplateSpecs, checked as such.
    for group, template in ray_pod_templates(service).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{group} pod template: {exc}")
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_serve_config_is_qserves_application(kuberay):
    import importlib

    from qserve.serve.ray_serve import parse_config

    service = one(kuberay, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = parse_config(app["args"], "serveConfigV2")
    templates = ray_pod_templates(service)
    head = templates["head"]["spec"]
    (init,) = head["initContainers"]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    fetched = f"{init_env['MODELS_DIR']}/{init_env['MODEL_NAME']}"
    assert [m.serve["model"] for m in cfg.models] == [fetched]
    config_maps = {c["metadata"]["name"]: c for c in by_kind(kuberay, "ConfigMap")}
    claim = one(kuberay, "PersistentVolumeClaim")["metadata"]["name"]
    for group, template in templates.items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["image"].endswith(":cpu-ray"), group
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            assert mounts["models"] == init_env["MODELS_DIR"], group
            for name in mounts:
                volume = volumes[name]
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{group}: {name} names no rendered ConfigMap"
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] == claim
    (script_volume,) = [v for v in head["volumes"] if "configMap" in v]
    script = config_maps[script_volume["configMap"]["name"]]["data"]["fetch-model.sh"]
    assert script == FETCH_SCRIPT.read_text()


def test_kuberay_pod_monitor_scrapes_the_replicas_metrics_port(kuberay):
    """The serve config's metrics_port is a named port of every worker pod that runs replicas, and the
    PodMonitor selects those pods and scrapes that port."""
    from qserve.serve.ray_serve import parse_config

    service, monitor = one(kuberay, "RayService"), one(kuberay, "PodMonitor")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cfg = parse_config(app["args"], "serveConfigV2")
    assert cfg.metrics_port is not None
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and re.fullmatch(r"\d+s", endpoint["interval"])
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        template = group["template"]
        assert matches(monitor["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]), group["groupName"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports[endpoint["port"]] == cfg.metrics_port, group["groupName"]
