"""`launch k8s --serve` manifests: valid against the Kubernetes schema (tests/launch/k8s_schema.py), one Deployment +
Service per replica with readiness on /ready, and a gateway whose generated TOML the gateway itself accepts."""

from __future__ import annotations

import pytest
import yaml

from gigafactory.errors import UserError
from gigafactory.gateway.config import parse_config
from gigafactory.launch.k8s_serve import ServeFleetSpec, parse_regions, render_serve


def test_manifest_is_valid_and_wires_every_replica_into_the_gateway():
    from tests.launch.k8s_schema import validate_manifest

    spec = ServeFleetSpec(parse_regions("eu=3, US=2"), "/runs/grok/checkpoints/step-1000", name="grok-eu",
                          serve_args=("--slots", "32"), region_label="topology.kubernetes.io/region",
                          countries={"EU": ["DE", "FR"]})
    text = render_serve(spec, "gigafactory launch k8s --serve ...")
    docs = list(yaml.safe_load_all(text))
    validate_manifest(docs)
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    replicas = [n for k, n in kinds if k == "Deployment" and n != "grok-eu-gateway"]
    assert replicas == ["grok-eu-eu-0", "grok-eu-eu-1", "grok-eu-eu-2", "grok-eu-us-0", "grok-eu-us-1"]
    assert sorted(n for k, n in kinds if k == "Service") == sorted(replicas + ["grok-eu-gateway"])
    deployment = next(d for d in docs if d["metadata"]["name"] == "grok-eu-us-1" and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"][:4] == ["gigafactory", "serve", "--checkpoint", "grok=/runs/grok/checkpoints/step-1000"]
    assert container["command"][-2:] == ["--slots", "32"] and pod["nodeSelector"] == {"topology.kubernetes.io/region": "US"}
    service = next(d for d in docs if d["metadata"]["name"] == "grok-eu-us-1" and d["kind"] == "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = parse_config(config_map["data"]["gateway.toml"], "configmap")
    assert [(r.name, r.url, r.region) for r in cfg.replicas][3] == ("grok-eu-us-0", "http://grok-eu-us-0:8000", "US")
    assert cfg.regions["EU"].countries == ("DE", "FR") and cfg.regions["US"].fallback == "grok"
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "grok-eu-gateway")
    assert gateway["spec"]["strategy"] == {"type": "Recreate"}
    assert "gigafactory gateway --config /etc/gigafactory/gateway.toml" in gateway["spec"]["template"]["spec"]["containers"][0]["command"][2]


@pytest.mark.parametrize("text, message", [("EU", "must be REGION=REPLICAS"), ("EU=0", "must be REGION=REPLICAS"),
                                           ("EU=1,eu=2", "given twice"), ("", "at least one")])
def test_bad_regions_are_one_line(text, message):
    with pytest.raises(UserError, match=message):
        parse_regions(text)


def test_bad_spec_is_one_line():
    with pytest.raises(UserError, match="path inside the pods"):
        render_serve(ServeFleetSpec({"EU": 1}, "runs/x"))
    with pytest.raises(UserError, match="Kubernetes name"):
        render_serve(ServeFleetSpec({"EU": 1}, "/runs/x", name="Grok_EU"))


def test_launch_cli_writes_the_fleet_and_refuses_what_it_cannot(tmp_path, capsys):
    from gigafactory.cli.main import main
    from tests.launch.k8s_schema import validate_manifest

    out = tmp_path / "fleet.yaml"
    argv = ["launch", "k8s", "--serve", "--regions", "EU=2,US=1", "--checkpoint", "/runs/grok", "--gpus-per-replica", "0"]
    assert main([*argv, "--out", str(out), "--", "--slots", "8"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    validate_manifest(docs)
    serve = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "grok-gateway"]
    assert len(serve) == 3 and all(d["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--slots", "8"] for d in serve)
    assert "3 serve replica(s) + gateway" in capsys.readouterr().err
    for bad, reason in ((["launch", "slurm", "--serve", "--checkpoint", "/x"], "launch k8s --serve"),
                        (["launch", "k8s", "--serve"], "give --checkpoint"),
                        ([*argv, "--checkpoint", "/x\nkind: Secret"], "contains a newline"),  # no YAML of the user's
                        ([*argv, "--pool", "a=b"], "--pool 'a=b'"),
                        ([*argv, "--regions", "EU=" + "9" * 30], "replicas 1..1000"),
                        ([*argv, "--nodes", "4"], "--nodes is for a training job"),
                        ([*argv, "--name", "9fleet"], "a lowercase letter"),
                        ([*argv, "--name", "f" * 40, "--regions", "A" * 20 + "=100"], "over Kubernetes' 63 characters"),
                        (["launch", "k8s"], "give --nodes")):
        assert main(bad) == 2
        assert reason in capsys.readouterr().err


def test_several_gateway_pods_each_enforce_their_share():
    from tests.launch.k8s_schema import validate_manifest

    docs = list(yaml.safe_load_all(render_serve(ServeFleetSpec({"EU": 1}, "/runs/x", gateway_pods=3))))
    validate_manifest(docs)
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "grok-gateway")
    assert gateway["spec"]["replicas"] == 3
    assert gateway["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}  # never a 4th pod
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert parse_config(config_map["data"]["gateway.toml"], "configmap").pods == 3
    with pytest.raises(UserError, match="gateway pods 0 must be in 1..64"):
        render_serve(ServeFleetSpec({"EU": 1}, "/runs/x", gateway_pods=0))
