"""Tests of `local_gcs.py`: every storage client the project uses reads and
writes `gs://` paths on the local server (through the `gcs` fixture's
environment), and the server keeps its objects across a restart."""

import http.client
import ssl
import threading

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from clu import metric_writers
from etils import epath
from google.cloud import storage

GOOGLE_HOSTS = {'www.googleapis.com:443', 'storage.googleapis.com:443'}


def tunnel_request(gcs, host, path, verify=True):
  """GET `path` through the proxy's tunnel to `host`: (status, body)."""
  context = ssl.create_default_context(
    cafile=gcs.environment()['CURL_CA_BUNDLE']
  )
  context.check_hostname = verify
  connection = http.client.HTTPSConnection(
    '127.0.0.1', gcs.proxy_port, context=context, timeout=60
  )
  connection.set_tunnel(host, 443)
  try:
    connection.request('GET', path)
    response = connection.getresponse()
    return response.status, response.read()
  finally:
    connection.close()


def test_gfile_writes_reads_lists_renames_and_deletes(gcs, gcs_bucket):
  hosts_before = len(gcs.proxied_hosts)
  big = np.random.default_rng(0).bytes(3 << 20)  # Beyond curl's Expect size.
  gfile = tf.io.gfile
  with gfile.GFile(f'{gcs_bucket}/run/a.txt', 'w') as f:
    f.write('hello')
  with gfile.GFile(f'{gcs_bucket}/run/sub/big.bin', 'wb') as f:
    f.write(big)
  assert sorted(gfile.listdir(f'{gcs_bucket}/run')) == ['a.txt', 'sub/']
  assert gfile.glob(f'{gcs_bucket}/run/*.txt') == [f'{gcs_bucket}/run/a.txt']
  # TensorFlow asks for the bucket's storageLayout first (the proxy's).
  gfile.rename(f'{gcs_bucket}/run', f'{gcs_bucket}/moved')
  # False only with GCS_STAT_CACHE_MAX_AGE=0 before TensorFlow's import.
  assert not gfile.exists(f'{gcs_bucket}/run')
  assert gfile.GFile(f'{gcs_bucket}/moved/a.txt').read() == 'hello'
  assert gfile.GFile(f'{gcs_bucket}/moved/sub/big.bin', 'rb').read() == big
  gfile.rmtree(f'{gcs_bucket}/moved')
  assert not gfile.exists(f'{gcs_bucket}/moved')
  assert set(gcs.proxied_hosts[hosts_before:]) <= GOOGLE_HOSTS


def test_epath(gcs_bucket):
  directory = epath.Path(gcs_bucket) / 'dir'
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'x.txt').write_text('abc')
  assert (directory / 'x.txt').read_text() == 'abc'
  assert [p.name for p in directory.iterdir()] == ['x.txt']
  directory.rmtree()
  assert not directory.exists()


def test_clu_writer_writes_tensorboard_events(gcs_bucket):
  logdir = f'{gcs_bucket}/logs'
  writer = metric_writers.create_default_writer(logdir)
  writer.write_scalars(3, {'train_loss': 0.5})
  writer.close()
  (events,) = tf.io.gfile.glob(f'{logdir}/events.out.tfevents.*')
  values = [
    (event.step, value.tag, float(tf.make_ndarray(value.tensor)))
    for event in tf.compat.v1.train.summary_iterator(events)
    for value in event.summary.value
  ]
  assert values == [(3, 'train_loss', 0.5)]


def test_orbax_checkpoint_manager_saves_and_restores(gcs_bucket):
  tree = {'w': jnp.arange(6.0).reshape(2, 3), 'b': {'n': jnp.ones(4, 'int32')}}
  manager = ocp.CheckpointManager(f'{gcs_bucket}/checkpoints')
  for step in (1, 2):
    manager.save(step, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  restored = manager.restore(2, args=ocp.args.StandardRestore(tree))
  assert manager.all_steps() == [1, 2]
  manager.close()
  np.testing.assert_array_equal(restored['w'], tree['w'])
  np.testing.assert_array_equal(restored['b']['n'], tree['b']['n'])
  # TensorStore wrote the arrays' chunks into the bucket.
  names = [blob.name for blob in storage.Client().list_blobs(gcs_bucket[5:])]
  assert any(name.startswith('checkpoints/2/default/d/') for name in names)


def test_storage_client_and_gfile_see_the_same_objects(gcs_bucket):
  bucket = storage.Client().bucket(gcs_bucket[5:])
  bucket.blob('from_client.txt').upload_from_string('client')
  with tf.io.gfile.GFile(f'{gcs_bucket}/from_gfile.txt', 'w') as f:
    f.write('gfile')
  assert [b.name for b in bucket.client.list_blobs(bucket)] == [
    'from_client.txt',
    'from_gfile.txt',
  ]
  assert bucket.blob('from_gfile.txt').download_as_text() == 'gfile'
  assert tf.io.gfile.GFile(f'{gcs_bucket}/from_client.txt').read() == 'client'


def test_restart_keeps_the_port_and_the_objects(gcs, gcs_bucket):
  path = f'{gcs_bucket}/kept.txt'
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write('kept')
  port = gcs.port
  gcs.stop()
  assert not gcs.running
  # The proxy stays up and answers as GCS does in an outage.
  status, _ = tunnel_request(gcs, 'www.googleapis.com', '/storage/v1/b')
  assert status == 503
  gcs.start()
  assert gcs.port == port
  assert tf.io.gfile.GFile(path).read() == 'kept'


def test_gfile_rides_out_an_outage(gcs, gcs_bucket):
  path = f'{gcs_bucket}/kept.txt'
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write('kept')
  gcs.stop()
  restart = threading.Timer(1.0, gcs.start)
  restart.start()
  try:
    # TensorFlow retries the proxy's 503s with backoff.
    assert tf.io.gfile.GFile(path).read() == 'kept'
  finally:
    restart.join()


def test_proxy_forwards_every_tunnel_to_the_local_server(gcs):
  # Whatever host a client names, its request reaches only the local server.
  status, body = tunnel_request(
    gcs, 'example.com', '/storage/v1/b', verify=False
  )
  assert status == 200 and b'storage#buckets' in body
  assert gcs.proxied_hosts[-1] == 'example.com:443'
  with pytest.raises(ssl.SSLCertVerificationError):
    tunnel_request(gcs, 'example.com', '/')  # Not a googleapis.com name.


def test_proxy_refuses_plain_http_requests(gcs):
  connection = http.client.HTTPConnection('127.0.0.1', gcs.proxy_port)
  try:
    connection.request('GET', 'http://example.com/')
    assert connection.getresponse().status == 403
  finally:
    connection.close()
  assert gcs.proxied_hosts[-1] == 'http://example.com/'
