"""Static checks of the deployment artefacts (no Docker engine or cluster here): the compose
file and the Kustomize manifests are loaded and checked for what production needs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from shared.config import Settings
from shared.topology import SERVICES as TOPOLOGY_SERVICES
from shared.topology import STAGES
from tests.helpers import REPO

SERVICES = tuple(s.name for s in TOPOLOGY_SERVICES)


def known_env(name: str) -> bool:
    """Is RADSTREAM_X or RADSTREAM_X__Y a field of the settings model?"""
    if not name.startswith("RADSTREAM_"):
        return True
    parts = name[len("RADSTREAM_") :].lower().split("__")
    model: Any = Settings
    for part in parts:
        fields = model.model_fields
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        if model is None and part != parts[-1]:
            return False
    return True


def test_env_check_knows_settings_from_typos() -> None:
    assert known_env("RADSTREAM_KAFKA__PASSWORD_FILE") and known_env("RADSTREAM_DEVICE")
    assert not known_env("RADSTREAM_KAFKA__PASWORD") and not known_env("RADSTREAM_NOPE")


def test_compose_file_has_the_whole_stack_done_properly() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {
        "pki",
        "kafka",
        "kafka-init",
        *SERVICES,
        "orthanc",
        "prometheus",
        "grafana",
    }
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.1")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert (
        "SASL_SSL" in env["KAFKA_LISTENERS"]
        and env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    )
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert "StandardAuthorizer" in env["KAFKA_AUTHORIZER_CLASS_NAME"]
    for one_shot in ("pki", "kafka-init"):
        assert services[one_shot]["restart"] == "no"
    volumes = set(compose["volumes"])
    for name, svc in services.items():
        if name not in ("pki", "kafka-init"):
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for mount in svc.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else str(mount).split(":")[0]
            assert source.startswith("./") or source in volumes, f"{name}: unknown volume {source}"
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
        for key in svc.get("environment", {}):
            assert known_env(key), f"{name}: {key} is not a setting"
    for name in SERVICES:
        module = services[name]["command"][-1]
        assert module == next(s.module for s in TOPOLOGY_SERVICES if s.name == name)
        assert importlib.util.find_spec(module) is not None
        assert services[name]["environment"]["RADSTREAM_KAFKA__USERNAME"] == name
    assert (REPO / "deploy" / "Dockerfile").read_text().count("FROM ") == 1


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests() -> None:
    base = REPO / "deploy" / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in _load(base / f)]
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    assert set(by_kind["Deployment"]) == set(SERVICES)
    for name, dep in by_kind["Deployment"].items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert (
            container["resources"]["requests"]["cpu"]
            and container["resources"]["requests"]["memory"]
        )
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert all(known_env(e["name"]) for e in container["env"]), name
        assert name in by_kind["PodDisruptionBudget"] and name in by_kind["NetworkPolicy"]
    assert "default-deny" in by_kind["NetworkPolicy"]
    assert "radstream-credentials" not in by_kind["Secret"]  # no shared secret any more
    assert {f"radstream-{name}" for name in SERVICES} <= set(by_kind["Secret"])
    for stage in STAGES:
        so = by_kind["ScaledObject"][stage.name]["spec"]
        trigger = so["triggers"][0]["metadata"]
        assert (
            trigger["topic"] == f"radstream.{stage.input}"
            and trigger["consumerGroup"] == f"radstream.{stage.name}"
        )
        assert so["maxReplicaCount"] <= 3  # never more consumers than partitions
    assert "gateway" not in by_kind["ScaledObject"]
    overlay = REPO / "deploy" / "k8s" / "overlays" / "gpu"
    assert yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"] == [
        "../../base"
    ]
    patched = {d["metadata"]["name"]: d for d in _load(overlay / "gpu-workers.yaml")}
    assert set(patched) == {"preprocess", "segmentation"}
    for name, patch in patched.items():
        (container,) = patch["spec"]["template"]["spec"]["containers"]
        assert container["name"] == name and container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "RADSTREAM_DEVICE", "value": "gpu"} in container["env"]
        # CuPy's kernel cache on the volume the base deployment mounts: kept across restarts
        cache = {e["name"]: e["value"] for e in container["env"]}["CUPY_CACHE_DIR"]
        mounts = by_kind["Deployment"][name]["spec"]["template"]["spec"]["containers"][0]
        assert any(
            cache.startswith(m["mountPath"] + "/") and not m["mountPath"].startswith("/secrets")
            for m in mounts["volumeMounts"]
        ), (name, cache)


def test_pacs_delivery_is_the_results_stage_s_in_every_deployment() -> None:
    """The stage that delivers to the PACS (topology ``delivers``) is the only one configured
    for it: compose env and Orthanc's allowed peer, the Kubernetes env and egress to 4242."""
    pacs_stages = {s.name for s in STAGES if "pacs" in s.delivers}
    assert pacs_stages == {"results"}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in SERVICES:
        env = compose[name]["environment"]
        assert any(k.endswith("__PACS_HOST") for k in env) == (name in pacs_stages), name
    assert compose["results"]["environment"]["RADSTREAM_RESULTS__PACS_HOST"] == "orthanc"
    modalities = compose["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"]
    assert '"results"' in modalities and '"alert"' not in modalities
    base = REPO / "deploy" / "k8s" / "base"
    deployments = {d["metadata"]["name"]: d for d in _load(base / "deployments.yaml")}
    policies = {d["metadata"]["name"]: d for d in _load(base / "networkpolicies.yaml")}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in _load(base / "secrets.yaml")}
    for name in SERVICES:
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        env = {e["name"] for e in container["env"]}
        assert any(e.endswith("__PACS_HOST") for e in env) == (name in pacs_stages), name
        egress_ports = {
            p["port"] for rule in policies[name]["spec"].get("egress", []) for p in rule["ports"]
        }
        assert (4242 in egress_ports) == (name in pacs_stages), name
        assert f"{name}.password" in secrets[f"radstream-{name}"]


def test_kubernetes_one_secret_per_service_and_the_admin_only_in_the_bootstrap_job() -> None:
    """The attack (issue 14): every pod mounted the whole credentials Secret, so compromising
    the gateway gave every principal. Now each pod mounts its own Secret, holding its own
    password and key file only; the admin credential is mounted by the bootstrap Job alone;
    the files are readable by the pod's user and pass the key-file mode check."""
    import os
    import stat as st

    from shared.security.keyfile import mode_problem

    base = REPO / "deploy" / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in _load(base / f)]
    secrets = {
        d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"
    }
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }
    assert set(pods) == {*SERVICES, "radstream-bootstrap"}
    mounted_by: dict[str, set[str]] = {}
    for name, pod in pods.items():
        for vol in pod["volumes"]:
            if "secret" in vol:
                mounted_by.setdefault(vol["secret"]["secretName"], set()).add(name)
    assert mounted_by["radstream-bootstrap"] == {"radstream-bootstrap"}
    assert "admin.properties" in secrets["radstream-bootstrap"]
    for name in SERVICES:
        own = f"radstream-{name}"
        assert mounted_by[own] == {name}, f"{own} is mounted by {mounted_by[own]}"
        data = secrets[own]
        passwords = {k for k in data if k.endswith(".password")}
        assert passwords == {f"{name}.password"}, name
        assert "keys.json" in data and "keyring.json" not in data and "admin.properties" not in data
        (container,) = pods[name]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RADSTREAM_KEYRING_FILE"] == "/secrets/keys.json"
        assert env["RADSTREAM_KAFKA__PASSWORD_FILE"] == f"/secrets/{name}.password"
        for value in env.values():  # every file it names under /secrets is in its own Secret
            if str(value).startswith("/secrets/") and str(value).count("/") == 2:
                assert str(value).removeprefix("/secrets/") in data, (name, value)
        # as mounted: root-owned, group = fsGroup, defaultMode; the service user reads it
        # and the key-file check accepts it; a world-readable mode would be refused
        ctx = pods[name]["securityContext"]
        (vol,) = [v for v in pods[name]["volumes"] if v.get("secret", {}).get("secretName") == own]
        mode = vol["secret"]["defaultMode"]
        assert mode & 0o007 == 0 and mode & 0o040, oct(mode)
        fake = os.stat_result((st.S_IFREG | mode, 0, 0, 1, 0, ctx["fsGroup"], 0, 0, 0, 0))
        assert mode_problem(fake, euid=ctx["runAsUser"], egid=ctx["fsGroup"]) == ""
        loose = os.stat_result((st.S_IFREG | 0o444, 0, 0, 1, 0, ctx["fsGroup"], 0, 0, 0, 0))
        assert mode_problem(loose, euid=ctx["runAsUser"], egid=ctx["fsGroup"]) != ""


def test_the_bootstrap_job_s_inputs_come_from_the_image(tmp_path: Path) -> None:
    from shared.stack import principals

    assert principals.main([str(tmp_path)]) == 0
    assert (tmp_path / "spec.tsv").read_text() == principals.spec("radstream.", 3)
    assert (tmp_path / "Bootstrap.java").read_bytes() == (
        REPO / "deploy" / "kafka" / "Bootstrap.java"
    ).read_bytes()
    assert "COPY deploy/kafka/Bootstrap.java" in (REPO / "deploy" / "Dockerfile").read_text()


def test_compose_each_service_mounts_only_its_own_secrets_owned_by_its_user_0400(
    tmp_path: Path,
) -> None:
    """The attack (issue 14): the shared secrets volume was readable in every container (the
    admin password, every SCRAM password, the broker's keystore) while a service's own
    password and the keyring were unreadable to the service user. Now each service mounts
    its folder principals/<service> only (read-only), holding its password, its key file and
    the files its settings name, uid 10001, 0400; what pki writes is checked as it writes it."""
    import os
    import stat as st

    from shared.security.envelope import init_keyring_file
    from shared.security.keyfile import mode_problem, read_key_file
    from shared.stack import compose_secrets

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in SERVICES:
        mounts = services[name]["volumes"]
        secret_mounts = [m for m in mounts if isinstance(m, dict) and m["source"] == "secrets"]
        assert [str(m) for m in mounts if "secrets" in str(m) and not isinstance(m, dict)] == []
        (mount,) = secret_mounts
        assert mount["target"] == "/secrets" and mount["read_only"] is True
        assert mount["volume"]["subpath"] == f"principals/{name}"
        env = services[name]["environment"]
        files = compose_secrets.service_files(name)
        assert env["RADSTREAM_KEYRING_FILE"] == "/secrets/keys.json"
        assert env["RADSTREAM_KAFKA__PASSWORD_FILE"] == f"/secrets/{name}.password"
        for value in env.values():
            if str(value).startswith("/secrets/"):
                assert str(value).removeprefix("/secrets/") in files, (name, value)
        assert not any(k.endswith(".password") and k != f"{name}.password" for k in files)
        assert "keyring.json" not in files and "admin.properties" not in files
    # what pki writes (as this user here; uid 10001 in the container)
    out = tmp_path / "secrets"
    out.mkdir()
    init_keyring_file(out / "keyring.json")
    for name in SERVICES:
        for source in compose_secrets.service_files(name).values():
            if source != "keyring.json":
                (out / source).parent.mkdir(parents=True, exist_ok=True)
                (out / source).write_text(f"{source} contents")
    uid, gid = os.getuid(), os.getgid()
    for folder in compose_secrets.write_service_secrets(out, uid, gid):
        name = folder.name
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == (
            sorted(compose_secrets.service_files(name))
        )
        for path in folder.rglob("*"):
            mode = st.S_IMODE(path.stat().st_mode)
            assert mode == (0o500 if path.is_dir() else 0o400), (path, oct(mode))
            assert path.stat().st_uid == uid
            if path.is_file():
                assert mode_problem(path.stat(), euid=uid, egid=gid) == ""
        keys = read_key_file(folder / "keys.json")
        assert keys.principal == name
        if name == "gateway":  # it seals instances, opens nothing
            assert all(p.private is None for pk in keys.purposes.values() for p in pk.keys.values())
