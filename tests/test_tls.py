"""DICOM TLS (BCP 195) on both sides of the node, with certificates made here by ``openssl``.

Listening: a caller with a certificate from the site CA gets in; one with a certificate from
another CA, one with none and a plain TCP (non-TLS) caller are refused; TLS below 1.2 and
non-BCP 195 cipher suites are refused. Sending: results go to a TLS destination that checks
the node's client certificate, and the node refuses a destination whose certificate it cannot
verify.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.dataset
import pydicom.uid
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from ms_forecast_node.config.settings import DestinationConfig, NodeConfig, TLSConfig
from ms_forecast_node.node import Node
from ms_forecast_node.receive.security import BCP195_CIPHERS
from ms_forecast_node.send.outbox import Sender, echo
from ms_forecast_node.store.database import Database

from .node_helpers import node_config, wait_for

NODE_AET = "MSFORECAST"
PEER_AET = "STORESCU"  # the peer node_helpers.node_config allows


# --- a throw-away PKI ------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the site CA's certificate (what both sides trust)
    node: Credentials  # the node's certificate, as server and as client (deploy/tls/README.md)
    pacs: Credentials  # the PACS' certificate from the site CA, as client and as server
    rogue_pacs: Credentials  # a PACS certificate signed by another CA


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    assert run.returncode == 0, f"openssl {' '.join(args)}: {run.stderr}"


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/O=Test Hospital/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> Credentials:
    """A certificate for ``usage`` (extendedKeyUsage) signed by ``ca``. RSA keys, so that a
    client offering only non-BCP 195 RSA suites is refused for the suite, not the key."""
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        encoding="ascii",
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/O=Test Hospital/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-sha256", "-days", "2", "-extfile", str(ext), "-out", str(cert),
        cwd=folder,
    )  # fmt: skip
    return Credentials(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (Debian package openssl)")
    folder = tmp_path_factory.mktemp("pki")
    site, other = _ca(folder, "site-ca"), _ca(folder, "other-ca")
    both = "serverAuth,clientAuth"
    return PKI(
        ca=site[0],
        node=_leaf(folder, "node", site, both),
        pacs=_leaf(folder, "pacs", site, both),
        rogue_pacs=_leaf(folder, "pacs-rogue", other, both),
    )


# --- the node listening with TLS ---------------------------------------------------------------
@pytest.fixture()
def tls_node(tmp_path: Path, pki: PKI) -> Iterator[Node]:
    tls = {
        "enabled": True,
        "cert_file": str(pki.node.cert),
        "key_file": str(pki.node.key),
        "ca_file": str(pki.ca),
        "require_client_certificate": True,
    }
    # No study is sent in these tests, so the results destination is never used.
    node = Node(node_config(tmp_path / "node", 9, listen={"tls": tls}))
    node.start()
    yield node
    node.stop()


def _client_context(pki: PKI, credentials: Credentials | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the chain is still checked
    if credentials is not None:
        ctx.load_cert_chain(str(credentials.cert), str(credentials.key))
    return ctx


def _echo(port: int, ctx: ssl.SSLContext | None, calling: str = PEER_AET) -> int | None:
    """C-ECHO status, or None when no association was established."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=NODE_AET,
        tls_args=(ctx, "localhost") if ctx is not None else None,
    )
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if status else None


def _echoscu(port: int, *tls_options: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("echoscu")
    if tool is None:
        pytest.skip("dcmtk's echoscu is not installed (Debian package dcmtk)")
    command = [tool, "-aet", PEER_AET, "-aec", NODE_AET, "-to", "10", *tls_options]
    return subprocess.run(
        [*command, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_trusted_client_certificate_gets_c_echo(tls_node: Node, pki: PKI) -> None:
    assert _echo(tls_node.port, _client_context(pki, pki.pacs)) == 0x0000
    # The audit record is written when the association ends on the node's side, which can
    # come after our release returns (a failure seen under CPU load).
    wait_for(
        lambda: any(
            r["calling_ae"] == PEER_AET and r["tls"] and r["echoes"] == 1
            for r in tls_node.audit.records()
        ),
        30,
        "the TLS association's audit record",
    )


def _server_alert(port: int, ctx: ssl.SSLContext) -> str:
    """The alert with which the node ends a handshake. With TLS 1.3 the client finishes its
    side before the server has checked the client's certificate, so the alert may only come
    with the first read."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(5)
            tls.recv(1)
    except ssl.SSLError as exc:
        return str(exc)
    except TimeoutError:
        return "accepted"  # the node waits for an A-ASSOCIATE-RQ
    return "closed without an alert"


def test_client_certificate_from_another_ca_is_refused(tls_node: Node, pki: PKI) -> None:
    assert _echo(tls_node.port, _client_context(pki, pki.rogue_pacs)) is None
    assert "unknown ca" in _server_alert(tls_node.port, _client_context(pki, pki.rogue_pacs))
    assert _server_alert(tls_node.port, _client_context(pki, pki.pacs)) == "accepted"
    # ... and the node still serves the right one.
    assert _echo(tls_node.port, _client_context(pki, pki.pacs)) == 0x0000


def test_client_without_certificate_is_refused(tls_node: Node, pki: PKI) -> None:
    assert _echo(tls_node.port, _client_context(pki, None)) is None
    alert = _server_alert(tls_node.port, _client_context(pki, None))
    assert "certificate required" in alert  # TLS 1.3's alert for a missing certificate


def test_plain_association_is_refused(tls_node: Node, pki: PKI) -> None:
    assert _echo(tls_node.port, None) is None
    assert _echo(tls_node.port, _client_context(pki, pki.pacs)) == 0x0000


@pytest.mark.external
def test_dcmtk_echoscu_over_tls(tls_node: Node, pki: PKI) -> None:
    # dcmtk's default TLS profile is BCP 195 (non-downgrading); keys and certificates are PEM.
    good = _echoscu(
        tls_node.port,
        "+tls", str(pki.pacs.key), str(pki.pacs.cert),
        "+cf", str(pki.ca),
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    rogue = _echoscu(
        tls_node.port,
        "+tls", str(pki.rogue_pacs.key), str(pki.rogue_pacs.cert),
        "+cf", str(pki.ca),
    )  # fmt: skip
    assert rogue.returncode != 0
    plain = _echoscu(tls_node.port)
    assert plain.returncode != 0


def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """(TLS version, cipher) of a bare handshake with the node."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        return tls.version(), cipher[0] if cipher else None


# The test offers TLS 1.0 / 1.1 on purpose; Python warns that these versions are deprecated.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_bcp195_tls_below_1_2_and_weak_suites_are_refused(tls_node: Node, pki: PKI) -> None:
    # TLS 1.2 with the client offering everything: the node picks a BCP 195 suite.
    ctx = _client_context(pki, pki.pacs)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    version, cipher = _handshake(tls_node.port, ctx)
    assert version == "TLSv1.2"
    assert cipher in BCP195_CIPHERS.split(":")
    # TLS 1.3 is fine too.
    ctx = _client_context(pki, pki.pacs)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    assert _handshake(tls_node.port, ctx)[0] == "TLSv1.3"
    # A client that really offers TLS 1.0 / 1.1 (OpenSSL 3 needs security level 0 for them):
    # the node answers with a protocol_version alert (a refusal by the server, not by the
    # client's own library, which would say "no protocols available").
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx = _client_context(pki, pki.pacs)
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = old
        with pytest.raises(ssl.SSLError, match=r"(?i)alert.protocol.version"):
            _handshake(tls_node.port, ctx)
    # TLS 1.2 with only suites outside BCP 195 (RSA key exchange, CBC): no shared cipher.
    ctx = _client_context(pki, pki.pacs)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA:AES256-SHA256:ECDHE-RSA-AES128-SHA:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match=r"(?i)alert.handshake.failure"):
        _handshake(tls_node.port, ctx)
    # The node is still serving.
    assert _echo(tls_node.port, _client_context(pki, pki.pacs)) == 0x0000


def test_an_idle_connection_does_not_block_other_callers(tls_node: Node, pki: PKI) -> None:
    with socket.create_connection(("127.0.0.1", tls_node.port), timeout=10):
        time.sleep(0.5)  # connected, never says hello
        assert _echo(tls_node.port, _client_context(pki, pki.pacs)) == 0x0000


# --- the node sending to a TLS destination -----------------------------------------------------
@dataclass
class TLSReceiver:
    """The PACS as a pynetdicom Storage SCP that only admits TLS callers with a certificate
    from ``ca``."""

    credentials: Credentials
    ca: Path
    received: list[pydicom.Dataset]
    port: int = 0
    server: Any = None

    def start(self) -> TLSReceiver:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.credentials.cert), str(self.credentials.key))
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Verification)
        ae.add_supported_context(MRImageStorage, ALL_TRANSFER_SYNTAXES)

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            ssl_context=ctx,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        self.port = int(self.server.server_address[1])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture()
def tls_receiver(pki: PKI) -> Iterator[TLSReceiver]:
    receiver = TLSReceiver(pki.pacs, pki.ca, []).start()
    yield receiver
    receiver.stop()


def _sending_config(root: Path, port: int, pki: PKI) -> NodeConfig:
    # The node presents its certificate and checks the destination's against ca_file.
    tls = {
        "enabled": True,
        "cert_file": str(pki.node.cert),
        "key_file": str(pki.node.key),
        "ca_file": str(pki.ca),
    }
    return node_config(
        root,
        port,
        destinations={
            "results": {"ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": tls}
        },
    )


def test_echo_command_reaches_a_tls_destination(
    tmp_path: Path, pki: PKI, tls_receiver: TLSReceiver
) -> None:
    config = _sending_config(tmp_path / "node", tls_receiver.port, pki)
    ok, message = echo(config, config.destinations["results"], timeout_s=10)
    assert ok, message


def test_destination_with_an_untrusted_certificate_is_refused(tmp_path: Path, pki: PKI) -> None:
    rogue = TLSReceiver(pki.rogue_pacs, pki.ca, []).start()
    try:
        config = _sending_config(tmp_path / "node", rogue.port, pki)
        ok, _ = echo(config, config.destinations["results"], timeout_s=10)
        assert not ok
        assert rogue.received == []
    finally:
        rogue.stop()


def _mr_file(path: Path) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TLS"
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_sender_delivers_results_over_tls(
    tmp_path: Path, pki: PKI, tls_receiver: TLSReceiver
) -> None:
    """The outbox path the worker feeds: a job in ``sending`` with one queued object."""
    config = _sending_config(tmp_path / "node", tls_receiver.port, pki)
    config.storage.root.mkdir(parents=True)
    db = Database(config.storage.database_path)
    result = _mr_file(tmp_path / "result.dcm")
    now = time.time()
    with db.transaction() as con:
        job_id = con.execute(
            """INSERT INTO jobs (study_uid, version, state, calling_ae, destination,
                   created_at, updated_at) VALUES (?, 1, 'sending', ?, 'results', ?, ?)""",
            (str(result.StudyInstanceUID), PEER_AET, now, now),
        ).lastrowid
        con.execute(
            """INSERT INTO outbox (job_id, sop_instance_uid, sop_class_uid, path, destination,
                   state, next_attempt_at) VALUES (?, ?, ?, ?, 'results', 'pending', ?)""",
            (job_id, str(result.SOPInstanceUID), MRImageStorage, str(tmp_path / "result.dcm"), now),
        )
    Sender(config, db).tick()
    assert [str(ds.SOPInstanceUID) for ds in tls_receiver.received] == [result.SOPInstanceUID]
    assert db.outbox_counts() == {"sent": 1}
    assert db.job(int(job_id or 0))["state"] == "done"


def test_tls_configuration_needs_its_files() -> None:
    with pytest.raises(ValueError, match="ca_file"):
        TLSConfig(enabled=True, require_client_certificate=True)
    dest = DestinationConfig(ae_title="PACS", host="127.0.0.1", port=104)
    assert dest.tls.enabled is False  # plain unless configured


# --- both directions with a real PACS ---------------------------------------------------------
@pytest.mark.external
def test_orthanc_and_the_node_talk_dicom_tls_both_ways(tmp_path: Path, pki: PKI) -> None:
    """Orthanc with DICOM TLS (as in deploy/tls/README.md): Orthanc → node C-ECHO with its
    certificate, node → Orthanc C-ECHO with the node's, and plain DICOM refused by both."""
    from .test_orthanc_integration import ORTHANC_AET, Orthanc, free_port, orthanc_binary

    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    dicom_port = free_port()
    mine = {
        "enabled": True,
        "cert_file": str(pki.node.cert),
        "key_file": str(pki.node.key),
        "ca_file": str(pki.ca),
    }
    config = NodeConfig.model_validate(
        {
            "listen": {"port": 0, "tls": {**mine, "require_client_certificate": True}},
            "peers": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1"}],
            "destinations": {
                "pacs": {
                    "ae_title": ORTHANC_AET,
                    "host": "127.0.0.1",
                    "port": dicom_port,
                    "tls": mine,
                }
            },
            "storage": {"root": str(tmp_path / "node"), "min_free_bytes": 0},
            "status_page": {"enabled": False},
        }
    )
    node = Node(config)
    node.start()
    orthanc = Orthanc(
        binary,
        tmp_path / "orthanc",
        free_port(),
        dicom_port,
        overrides={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.pacs.cert),
            "DicomTlsPrivateKey": str(pki.pacs.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": {"msforecast": {"UseDicomTls": True}},
        },
    )
    try:
        orthanc.start(node.port)
        # Orthanc → node: answers 200 only if the C-ECHO succeeded.
        assert orthanc.post("/modalities/msforecast/echo", b"{}") == {}
        ok, message = echo(config, config.destinations["pacs"], timeout_s=10)
        assert ok, message
        wait_for(
            lambda: any(
                r["calling_ae"] == ORTHANC_AET and r["tls"] and r["echoes"]
                for r in node.audit.records()
            ),
            30,
            "the audit record of Orthanc's TLS echo",
        )
        # Without TLS neither side lets the other in.
        plain = config.model_copy(
            update={
                "destinations": {
                    "pacs": config.destinations["pacs"].model_copy(update={"tls": TLSConfig()})
                }
            }
        )
        assert not echo(plain, plain.destinations["pacs"], timeout_s=10)[0]
        assert _echo(node.port, None, calling=ORTHANC_AET) is None
    finally:
        orthanc.stop()
        node.stop()
