"""The deployment artefacts in ``deploy/`` are consistent with the code and with each other.

They cannot all be run here (no Docker, no systemd as PID 1), so this checks what can be
checked: the example configuration is complete and valid, the commands they start exist, the
files they mount exist, and the names and ports shared between Orthanc, its Lua script, the
compose file and the node agree.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from ms_forecast_node.config.settings import NodeConfig, TLSConfig, load_config

from .test_orthanc_integration import load_orthanc_json

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "ms-forecast-node.example.yaml"
UNIT = DEPLOY / "systemd" / "ms-forecast-node.service"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILES = (DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.cuda")
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
LUA = DEPLOY / "orthanc" / "autoroute.lua"
TLS_README = DEPLOY / "tls" / "README.md"
SERVE = ["ms-forecast-node", "serve", "--config", "/etc/ms-forecast-node/node.yaml"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ms_forecast_node", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )


def _raw_example() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _example(environ: dict[str, str] | None = None) -> NodeConfig:
    # An empty environment: MSFN__ variables of whoever runs the tests must not leak in.
    return load_config(EXAMPLE, environ=environ or {})


# --- the example configuration -------------------------------------------------------------------
def _missing_fields(model: type[BaseModel], raw: Any, where: str) -> list[str]:
    """Fields of ``model`` (recursively: sections, list items, mapping values) absent in ``raw``."""
    assert isinstance(raw, dict), f"{where or 'top level'} is not a mapping"
    missing = []
    for name, info in model.model_fields.items():
        path = f"{where}.{name}" if where else name
        if name not in raw:
            missing.append(path)
            continue
        annotation = info.annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing += _missing_fields(annotation, raw[name], path)
        elif origin is tuple and args and isinstance(args[0], type):
            if issubclass(args[0], BaseModel):
                assert raw[name], f"{path}: give at least one example item"
                for i, item in enumerate(raw[name]):
                    missing += _missing_fields(args[0], item, f"{path}[{i}]")
        elif (
            origin is dict
            and len(args) == 2
            and isinstance(args[1], type)
            and issubclass(args[1], BaseModel)
        ):
            assert raw[name], f"{path}: give at least one example entry"
            for key, item in raw[name].items():
                missing += _missing_fields(args[1], item, f"{path}.{key}")
    return missing


def test_example_configuration_shows_every_field_and_loads() -> None:
    raw = _raw_example()
    assert set(NodeConfig.model_fields) <= set(raw), set(NodeConfig.model_fields) - set(raw)
    assert _missing_fields(NodeConfig, raw, "") == []
    assert not set(raw) - set(NodeConfig.model_fields)  # nothing the model does not know
    config = _example()
    assert config.destination_for(config.peers[0].ae_title) == "pacs"


def test_example_configuration_comments_every_top_level_section() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"{line!r} has no comment above it"


def test_config_check_and_serve_help_exit_zero() -> None:
    check = _cli("config", "check", "--config", str(EXAMPLE.relative_to(REPO)))
    assert check.returncode == 0, check.stderr
    assert "valid" in check.stdout
    helped = _cli("serve", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--config" in helped.stdout


# --- systemd -------------------------------------------------------------------------------------
def _unit() -> dict[str, list[str]]:
    """Directive → values (a directive may repeat), comments and section headers dropped."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit_starts_a_real_subcommand() -> None:
    argv = shlex.split(_unit()["ExecStart"][0])
    assert Path(argv[0]).name == "ms-forecast-node"
    assert argv[1:] == SERVE[1:]  # the same command as the Docker images
    helped = _cli(argv[1], "--help")
    assert helped.returncode == 0, helped.stderr
    for option in (a for a in argv[2:] if a.startswith("--")):
        assert option in helped.stdout


def test_systemd_unit_is_hardened() -> None:
    unit = _unit()
    expected = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "no",  # torch's JIT needs writable + executable memory
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], f"{key}: {unit.get(key)}"
    assert unit.get("DynamicUser") == ["yes"] or unit.get("User")
    # The storage the example configuration uses is the unit's writable state directory.
    root = str(_example().storage.root)
    assert root in unit["ReadWritePaths"][0].split()
    assert root == f"/var/lib/{unit['StateDirectory'][0]}"


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text(encoding="utf-8"), encoding="utf-8")
    run = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60
    )
    problems = [
        line
        for line in (run.stdout + run.stderr).splitlines()
        # The virtualenv of the unit is not installed on a test machine.
        if line.strip() and "is not executable" not in line
    ]
    assert problems == []


# --- Docker ---------------------------------------------------------------------------------
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_plain_and_consistent(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    entrypoints = [json.loads(rest) for key, rest in steps if key == "ENTRYPOINT"]
    assert entrypoints == [SERVE]
    for key, rest in steps:
        if key == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}"
    runs = " ".join(rest for key, rest in steps if key == "RUN")
    assert "dcmtk" in runs and "mricron-data" in runs
    base = next(rest for key, rest in steps if key == "FROM")
    args = dict(rest.split("=", 1) for key, rest in steps if key == "ARG" and "=" in rest)
    if dockerfile.name.endswith("cpu"):
        assert base.startswith("python:")
        assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert base.startswith("nvidia/cuda:") and "runtime" in base
        assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    # The torch the tests run with (the Makefile installs it).
    pinned = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text(encoding="utf-8"))
    if pinned:
        assert args["TORCH_VERSION"] == pinned[1]
    # The image's storage is the example configuration's, which the image ships.
    assert "/etc/ms-forecast-node/node.yaml" in " ".join(rest for _, rest in steps)
    assert str(_example().storage.root) in runs


# --- compose, Orthanc and the Lua script ---------------------------------------------------------
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _lua_setting(name: str) -> str:
    found = re.search(rf"^local {name} = '([^']*)'", LUA.read_text(encoding="utf-8"), re.M)
    assert found, name
    return found[1]


def test_compose_mounts_and_builds_files_that_exist() -> None:
    services = _compose()["services"]
    assert set(services) == {"orthanc", "node"}
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    mounted: dict[str, Path] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount of a repository file, not a named volume
                path = (COMPOSE.parent / source).resolve()
                assert path.exists(), f"{name}: {source} does not exist"
                mounted[target] = path
    build = services["node"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file()
    assert mounted["/etc/ms-forecast-node/node.yaml"] == EXAMPLE
    assert mounted["/etc/orthanc/orthanc.json"] == ORTHANC_JSON
    assert mounted["/etc/orthanc/autoroute.lua"] == LUA
    # Orthanc loads the Lua script from where compose mounts it.
    assert load_orthanc_json(ORTHANC_JSON)["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]


def test_orthanc_lua_compose_and_node_agree() -> None:
    orthanc = load_orthanc_json(ORTHANC_JSON)
    services = _compose()["services"]
    node_env = {k: str(v) for k, v in services["node"]["environment"].items()}
    in_compose = _example(node_env)
    example = _example()
    modality = _lua_setting("FORECAST_MODALITY")
    # The Lua script's names exist in Orthanc's configuration.
    assert modality in orthanc["DicomModalities"]
    assert _lua_setting("ROUTED_METADATA") in orthanc["UserMetadata"]
    assert orthanc["OverwriteInstances"] is True  # superseding results replace the old ones
    assert _lua_setting("NODE_AET") == example.listen.ae_title
    # Orthanc's view of the node and the node's view of Orthanc, in the example and in compose.
    compose_modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    for config, modalities, node_host in (
        (example, orthanc["DicomModalities"], None),
        (in_compose, compose_modalities, "node"),
    ):
        entry = modalities[modality]
        assert entry["AET"] == config.listen.ae_title
        assert entry["Port"] == config.listen.port
        if node_host is not None:
            assert entry["Host"] == node_host
        peer = config.peers[0]
        assert peer.ae_title == orthanc["DicomAet"]
        pacs = config.destinations[config.destination_for(peer.ae_title) or ""]
        assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert in_compose.destinations["pacs"].host == "orthanc"
    assert in_compose.peers[0].host is None  # container addresses change
    # The published ports are the configured ones.
    assert f"{orthanc['DicomPort']}:{orthanc['DicomPort']}" in services["orthanc"]["ports"]
    port = in_compose.listen.port
    assert f"{port}:{port}" in services["node"]["ports"]


# --- the TLS how-to -------------------------------------------------------------------------
def _blocks(language: str) -> list[str]:
    text = TLS_README.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


@pytest.mark.external
def test_tls_readme_openssl_commands_make_a_working_pki(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (Debian package openssl)")
    # Steps 1-3 as written, in a temporary folder instead of /etc/ms-forecast-node/tls.
    script = "\n".join(b for b in _blocks("bash") if "openssl req" in b or "openssl x509" in b)
    script = script.replace("/etc/ms-forecast-node/tls", str(tmp_path))
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for cert in ("node.pem", "pacs.pem"):
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", "site-ca.pem", cert],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    # The YAML of step 4 is a valid configuration fragment.
    fragment = next(yaml.safe_load(b) for b in _blocks("yaml") if "listen:" in b)
    config = NodeConfig.model_validate({**fragment, "peers": [{"ae_title": "ORTHANC"}]})
    assert config.listen.tls.require_client_certificate
    assert isinstance(config.destinations["pacs"].tls, TLSConfig)
    assert config.destinations["pacs"].tls.enabled
