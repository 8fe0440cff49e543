"""A loopback HTTPS CONNECT proxy that answers for Google's storage hosts with the GCS server behind it.

TensorFlow's own gs:// filesystem has its endpoints compiled in (https://www.googleapis.com,
https://storage.googleapis.com), so it cannot be pointed at a server on loopback; but it runs on
libcurl, which honours `https_proxy`, and TensorFlow reads `CURL_CA_BUNDLE` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING`. This proxy accepts `CONNECT <google host>:443`, completes the TLS
handshake itself with a certificate for those hosts signed by a CA made for the test, and relays
the decrypted HTTP to fake-gcs-server. TensorFlow's client then talks to the real server, through
its own code path, without touching the machine's DNS or trust store.

    with TLSProxy(upstream_port, folder) as proxy:
        env = proxy.environment()   # https_proxy, CURL_CA_BUNDLE, GOOGLE_AUTH_TOKEN_FOR_TESTING
"""

import datetime
import os
import socket
import ssl
import threading

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _certificates(folder):
    """Writes ca.pem and server.pem/server.key (for HOSTS, signed by the CA); returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trainer test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName(host) for host in HOSTS]), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(folder, f"{name}.pem") for name in ("ca", "server", "server-key")}
    with open(paths["ca"], "wb") as file:
        file.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server"], "wb") as file:
        file.write(server.public_bytes(serialization.Encoding.PEM))
    with open(paths["server-key"], "wb") as file:
        file.write(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths


def _pipe(source, destination):
    try:
        while data := source.recv(65536):
            destination.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, destination):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TLSProxy:
    """CONNECT proxy on 127.0.0.1 terminating TLS for HOSTS and relaying to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port, folder):
        self.upstream_port = upstream_port
        self.paths = _certificates(folder)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.paths["server"], self.paths["server-key"])
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.tunnels = []  # the hosts TensorFlow asked for, in order
        threading.Thread(target=self._accept, daemon=True).start()

    def environment(self):
        return {"https_proxy": f"http://127.0.0.1:{self.port}", "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
                "CURL_CA_BUNDLE": self.paths["ca"], "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
                "NO_GCE_CHECK": "true"}

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with client:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(4096)
                if not chunk:
                    return
                request += chunk
            method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
            host = target.rsplit(":", 1)[0]
            if method != "CONNECT" or host not in HOSTS:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(host)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                secure = self.context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):
                return
            with secure, socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                back = threading.Thread(target=_pipe, args=(upstream, secure), daemon=True)
                back.start()
                _pipe(secure, upstream)
                back.join(timeout=5)

    def close(self):
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
