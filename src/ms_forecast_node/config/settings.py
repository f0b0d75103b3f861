"""Node configuration (pydantic), loaded from YAML with ``MSFN__SECTION__KEY`` overrides.

Every field has a safe embedded default, so ``ms-forecast-node serve`` runs with no file at
all (loopback only, local folders, SQLite, the shipped model). ``ms-forecast-node config check``
validates a file and explains the effective configuration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ms_forecast_node.errors import ConfigurationError

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, 16 chars
ENV_PREFIX = "MSFN__"


def _ae(value: str) -> str:
    value = value.strip()
    if not AE_TITLE.match(value) or not value:
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    """DICOM TLS (BCP 195): TLS 1.2+ with the recommended cipher suites."""

    enabled: bool = False
    cert_file: Path | None = None  # our certificate (PEM)
    key_file: Path | None = None  # its private key (PEM)
    ca_file: Path | None = None  # CAs trusted for the peer's certificate
    require_client_certificate: bool = False  # server side: verify callers' certificates

    @model_validator(mode="after")
    def _files(self) -> TLSConfig:
        if self.enabled and self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file")
        return self


class ListenConfig(_Strict):
    ae_title: str = "MSFORECAST"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0: a free port (tests)
    require_called_ae: bool = True
    # Storage SOP Class UIDs accepted besides MR, Enhanced MR and Segmentation (e.g. to keep
    # a PACS from failing a whole routed study on its Secondary Captures). They are stored,
    # never processed.
    extra_sop_classes: tuple[str, ...] = ()

    @field_validator("extra_sop_classes")
    @classmethod
    def _uids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if not re.match(r"^[0-9]+(\.[0-9]+)*$", v) or len(v) > 64]
        if bad:
            raise ValueError(f"not SOP Class UIDs: {bad}")
        return value

    tls: TLSConfig = TLSConfig()

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae(v)))


class PeerConfig(_Strict):
    """A calling AE allowed to send studies (optionally only from ``host``)."""

    ae_title: str
    host: str | None = None
    quiet_period_s: float = Field(30.0, ge=0.0, le=3600.0)
    destination: str | None = None  # where results of its studies go (default: same AE title)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae(v)))


class DestinationConfig(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSConfig = TLSConfig()

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae(v)))


class StorageConfig(_Strict):
    root: Path = Path("var/node")
    database: Path | None = None  # default: <root>/node.sqlite
    min_free_bytes: int = Field(2 * 1024**3, ge=0)  # disk guard: refuse C-STORE below this

    @property
    def database_path(self) -> Path:
        return self.database or self.root / "node.sqlite"


class LimitsConfig(_Strict):
    max_pdu_bytes: int = Field(1_048_576, ge=0)  # 0: unlimited
    max_associations: int = Field(10, ge=1)
    max_instance_bytes: int = Field(1024**3, ge=1024)
    max_instances_per_study: int = Field(5000, ge=1)
    max_pixels_per_instance: int = Field(512 * 512 * 2000, ge=1)  # rows x columns x frames


class ProcessingConfig(_Strict):
    therapies: tuple[str, ...] | None = None  # None: every therapy of the model
    horizon_weeks: float = Field(48.0, gt=0.0, le=260.0)
    # None: the number the shipped model was evaluated with (its models.json entry)
    samples: int | None = Field(None, ge=1, le=512)
    # None: the steps the shipped model was evaluated with (its models.json entry)
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int = 0
    device: str = "auto"
    outputs: tuple[str, ...] | None = None  # None: the templates' produce list
    templates_dir: Path | None = None
    series_rules: Path | None = None


class SendingConfig(_Strict):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0.0)
    backoff_max_s: float = Field(600.0, gt=0.0)
    jitter: float = Field(0.2, ge=0.0, le=1.0)


class PriorRetrievalConfig(_Strict):
    """Fetch a prior study from a PACS (C-FIND/C-MOVE) when the node has none of the patient."""

    source: str | None = None  # a destination name; None: only priors already received
    max_studies: int = Field(1, ge=1, le=5)


class StatusPageConfig(_Strict):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: pick a free port
    token: str | None = None  # bearer token / basic-auth password; None: no auth (loopback)


class NodeConfig(_Strict):
    listen: ListenConfig = ListenConfig()
    peers: tuple[PeerConfig, ...] = ()
    accept_unknown_peers: bool = False  # True only for demos: any calling AE is accepted
    default_quiet_period_s: float = Field(30.0, ge=0.0)
    destinations: dict[str, DestinationConfig] = {}
    default_destination: str | None = None
    storage: StorageConfig = StorageConfig()
    limits: LimitsConfig = LimitsConfig()
    processing: ProcessingConfig = ProcessingConfig()
    sending: SendingConfig = SendingConfig()
    prior_retrieval: PriorRetrievalConfig = PriorRetrievalConfig()
    status_page: StatusPageConfig = StatusPageConfig()

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        names = set(self.destinations)
        for peer in self.peers:
            if peer.destination is not None and peer.destination not in names:
                raise ValueError(f"peer {peer.ae_title}: unknown destination {peer.destination!r}")
        source = self.prior_retrieval.source
        if source is not None and source not in names:
            raise ValueError(f"prior_retrieval.source {source!r} is not a defined destination")
        if self.default_destination is not None and self.default_destination not in names:
            raise ValueError(f"default_destination {self.default_destination!r} is not defined")
        return self

    def peer(self, ae_title: str) -> PeerConfig | None:
        """The allowed peer with this AE title. The prior-retrieval PACS is one implicitly:
        its C-MOVE sub-operations arrive as C-STOREs under its own title."""
        found = next((p for p in self.peers if p.ae_title == ae_title.strip()), None)
        source = self.prior_retrieval.source
        if found is None and source is not None:
            dest = self.destinations[source]
            if dest.ae_title == ae_title.strip():
                found = PeerConfig(ae_title=dest.ae_title, destination=source)
        return found

    def allowed_calling_aes(self) -> list[str]:
        titles = [p.ae_title for p in self.peers]
        if self.prior_retrieval.source is not None:
            titles.append(self.destinations[self.prior_retrieval.source].ae_title)
        return sorted(set(titles))

    def quiet_period(self, calling_ae: str) -> float:
        peer = self.peer(calling_ae)
        return peer.quiet_period_s if peer else self.default_quiet_period_s

    def destination_for(self, calling_ae: str) -> str | None:
        """Results go to the peer's destination, else one with the sender's AE title, else
        the default."""
        peer = self.peer(calling_ae)
        if peer is not None and peer.destination is not None:
            return peer.destination
        for name, dest in self.destinations.items():
            if dest.ae_title == calling_ae.strip():
                return name
        return self.default_destination

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with secrets masked (status page, config check)."""
        data = self.model_dump(mode="json")
        if data["status_page"].get("token"):
            data["status_page"]["token"] = "***"
        return data


def _env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """``MSFN__LISTEN__PORT=11113`` sets ``listen.port``; values are parsed as YAML."""
    for key, value in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigurationError(f"{key}: {part} is not a section")
            node = child
        node[path[-1]] = yaml.safe_load(value)
    return raw


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> NodeConfig:
    """Load ``path`` (or the embedded defaults) and apply ``MSFN__…`` environment overrides."""
    raw: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigurationError(f"configuration file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigurationError(f"{path}: the top level must be a mapping")
        raw = loaded or {}
    raw = _env_overrides(raw, dict(os.environ if environ is None else environ))
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(_explain(exc, source)) from None
