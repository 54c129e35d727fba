"""deploy/: every file parses; the Serve configs validate against Ray's own schema."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import yaml
from ray.serve import schema

from progsae.server.config import AppConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _check_serve_config(cfg: dict) -> None:
    parsed = schema.ServeDeploySchema.parse_obj(cfg)
    assert parsed.grpc_options.port == 9000
    for path in cfg["grpc_options"]["grpc_servicer_functions"]:
        module, fn = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), fn)), path
    (app,) = cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    AppConfig.from_dict(app["args"])  # every arg is a known AppConfig field
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Codec", "LanguageModel"}
    auto = deployments["Codec"]["autoscaling_config"]
    assert auto["max_replicas"] > auto["min_replicas"] >= 1
    # the fast path's load reaches the autoscaler: the policy Serve's controller will import
    module, fn = auto["policy"]["policy_function"].split(":")
    assert callable(getattr(importlib.import_module(module), fn))


def test_serve_config_validates():
    _check_serve_config(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))


def test_rayservice_manifest():
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    rs = next(d for d in docs if d["kind"] == "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    _check_serve_config(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {9000, 8000, 8080} <= head_ports
    group = cluster["workerGroupSpecs"][0]
    assert group["maxReplicas"] > group["minReplicas"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert 9000 in {p["port"] for p in services["progsae-grpc"]["spec"]["ports"]}
    # the replicas' own port: on every pod, behind a headless Service (clients balance round robin)
    direct = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["direct_grpc_port"]
    worker_ports = {p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
    assert direct in head_ports and direct in worker_ports
    svc = services["progsae-grpc-direct"]["spec"]
    assert svc["clusterIP"] == "None" and direct in {p["port"] for p in svc["ports"]}


def test_prometheus_config():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert "ray" in jobs and jobs["ray"]["static_configs"][0]["targets"]


def test_grafana_dashboard_uses_exported_metrics():
    dash = json.loads((DEPLOY / "grafana_dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in ("ray_progsae_requests_total", "ray_progsae_request_latency_ms_bucket",
                 "ray_progsae_encode_batch_size", "ray_progsae_rungs_streamed_total",
                 "ray_progsae_stream_stops_total", "ray_progsae_bytes_out_total"):
        assert name in exprs, name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
