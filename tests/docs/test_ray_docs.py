"""docs/ray/*.yaml are configurations Ray accepts, and docs/distributed.md names real settings.

``cluster.yaml`` is checked as ``ray up`` checks it: against the autoscaler's JSON schema
(``ray/autoscaler/ray-schema.json``), then filled with the provider's defaults and checked
again. ``kuberay.yaml``'s RayCluster goes through the conversion KubeRay's in-tree
autoscaler applies to the custom resource (which validates the result against the same
schema); its kiln Deployment must reach the head's Ray client port by the Service name
KubeRay gives the head.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
CLUSTER = DOCS / "ray" / "cluster.yaml"
KUBERAY = DOCS / "ray" / "kuberay.yaml"
GUIDE = DOCS / "distributed.md"

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")


def autoscaler_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def cluster() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))
    return config


def manifests() -> dict[str, dict[str, Any]]:
    """kuberay.yaml's documents by kind."""
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text(encoding="utf-8")) if d]
    return {d["kind"]: d for d in docs}


def test_the_cluster_config_is_one_ray_up_accepts() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster()
    jsonschema.validate(config, autoscaler_schema())
    filled = prepare_config(copy.deepcopy(config))  # the provider's defaults, as ray up does
    validate_config(filled)
    types = filled["available_node_types"]
    assert filled["head_node_type"] == "head" and set(types) == {"head", "cpu", "gpu"}
    assert all(0 <= types[t]["min_workers"] <= types[t]["max_workers"] for t in ("cpu", "gpu"))


def test_a_misspelt_key_in_the_cluster_config_is_refused() -> None:
    config = cluster()
    config["available_node_types"]["cpu"]["max_worker"] = 3  # sic
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, autoscaler_schema())


def test_every_node_installs_kiln_and_the_head_runs_a_kiln_worker_on_its_ray() -> None:
    config = cluster()
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and '"modelkiln"' in setup
    assert f"ray[default,train]=={ray.__version__}" in setup  # the Ray the workers run
    assert "kiln.env" in setup and config["file_mounts"]["~/kiln.env"] == "./kiln.env"
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "KILN_RAY_ADDRESS=auto nohup kiln worker" in head


def test_the_kuberay_cluster_autoscales_as_the_in_tree_autoscaler_reads_it() -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    found = manifests()
    assert set(found) == {"Namespace", "Secret", "RayCluster", "Deployment"}
    ray_cluster = found["RayCluster"]
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    assert ray_cluster["spec"]["enableInTreeAutoscaling"] is True
    assert ray_cluster["spec"]["rayVersion"] == ray.__version__
    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cluster))
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # training never lands on the head
    assert types["cpu"]["resources"]["CPU"] == 8 and "GPU" not in types["cpu"]["resources"]
    assert types["gpu"]["resources"]["GPU"] == 1
    assert (types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (0, 6)
    assert config["max_workers"] == 8


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_the_kiln_workers_reach_the_head_and_read_the_settings_secret() -> None:
    found = manifests()
    ray_cluster, deployment, secret = found["RayCluster"], found["Deployment"], found["Secret"]
    name, namespace = ray_cluster["metadata"]["name"], ray_cluster["metadata"]["namespace"]
    assert deployment["metadata"]["namespace"] == secret["metadata"]["namespace"] == namespace
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kiln", "worker"]
    # KubeRay names the head's Service <cluster>-head-svc; 6379 is the GCS port a driver joins
    assert env_of(container)["KILN_RAY_ADDRESS"] == f"{name}-head-svc:6379"
    head = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 6379, "name": "gcs-server"} in head["ports"]
    pods = [container, head] + [
        g["template"]["spec"]["containers"][0] for g in ray_cluster["spec"]["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
        assert pod["image"] == container["image"]  # one Ray and kiln everywhere
    assert {"KILN_DATABASE_URL", "KILN_ARTIFACTS", "KILN_MASTER_KEY"} <= set(secret["stringData"])


def test_the_docs_name_only_settings_kiln_reads() -> None:
    known = {f"KILN_{name.upper()}" for name in Settings.model_fields}
    for path in (GUIDE, CLUSTER, KUBERAY):
        named = set(re.findall(r"\bKILN_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
        assert named, path
        assert named <= known, (path.name, sorted(named - known))
    guide = GUIDE.read_text(encoding="utf-8")
    for setting in ("KILN_RAY_ADDRESS", "KILN_RAY_RESOURCE_TIMEOUT", "KILN_DATABASE_URL"):
        assert setting in guide
    timeout = Settings.model_fields["ray_resource_timeout"].default
    assert f"default {timeout:g})" in guide  # the documented default is the real one
