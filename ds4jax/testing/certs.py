"""Self-signed TLS certificates for tests (needs the `cryptography` test extra)."""

from __future__ import annotations

import datetime
import ipaddress
import os


def make_self_signed(directory: str, name: str = "server") -> tuple[str, str]:
  """Writes `<name>.crt` / `<name>.key` (PEM, EC P-256) valid for 127.0.0.1, ::1 and
  localhost for one day; returns (certfile, keyfile). The certificate is its own CA, so a
  client verifies it with `cafile=certfile`."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  key = ec.generate_private_key(ec.SECP256R1())
  subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
  now = datetime.datetime.now(datetime.timezone.utc)
  san = x509.SubjectAlternativeName([
      x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
      x509.IPAddress(ipaddress.ip_address("::1"))])
  cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(san, critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  certfile = os.path.join(directory, f"{name}.crt")
  keyfile = os.path.join(directory, f"{name}.key")
  with open(certfile, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(keyfile, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  os.chmod(keyfile, 0o600)
  return certfile, keyfile
