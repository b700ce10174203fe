"""A Google Cloud Storage emulator on loopback for the gs:// tests (no network needed).

gcp-storage-emulator (PyPI) serves the GCS JSON API. Two things real GCS does that it does not are
added here: the x-goog-generation header on downloads (tensorstore, orbax's array store, needs it
for conditional read-modify-writes) and objects.move (gcsfs's rename). The clients are pointed at
it through the environment (``emulator_env``): tensorstore by TENSORSTORE_GCS_HTTP_URL, etils.epath
through gcsfs by STORAGE_EMULATOR_HOST with EPATH_USE_TF=false (TensorFlow's GCS client has no
endpoint override). Checks read the bucket through the emulator's JSON API, not the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator

from gcp_storage_emulator.handlers import objects as _handlers

BUCKET = 'moma-test'


def _download_with_generation(request, response, storage, *args, **kwargs):
  _original_download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # noqa: BLE001 -- not found: the response already says so
    return
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))


def _move(request, response, storage, *args, **kwargs):
  """POST .../o/SRC/moveTo/o/DST: a copy then a delete (atomic on real GCS)."""
  p = request.params
  try:
    obj = _handlers._copy(
      request.base_url, storage, p['bucket_name'], p['object_id'], p['bucket_name'],
      p['dest_object_id'],
    )  # fmt: skip
  except Exception:  # noqa: BLE001 -- the emulator's NotFound
    response.status = 404
    return
  _handlers._delete(storage, p['bucket_name'], p['object_id'])
  response.json(obj)


# Patched before the server module builds its routing table from these handlers.
_original_download = _handlers.download
_handlers.download = _download_with_generation
from gcp_storage_emulator import server as _server  # noqa: E402

_server.HANDLERS = (
  (
    r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
    r'(?P<dest_object_id>.*[^/]+)$',
    {'POST': _move},
  ),
  *_server.HANDLERS,
)


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET) -> Iterator[tuple[str, str]]:
  """Runs an in-memory emulator on a free loopback port; yields (url, bucket)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = _server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  server.start()
  try:
    yield f'http://127.0.0.1:{port}', bucket
  finally:
    server.stop()


def emulator_env(url: str) -> dict[str, str]:
  """Environment for a subprocess whose gs:// paths must reach the emulator at ``url``."""
  from runlocal_helpers import FAST_COMPILE

  env = {**os.environ, 'XLA_FLAGS': FAST_COMPILE}  # one device (see runlocal_helpers)
  env.update(
    STORAGE_EMULATOR_HOST=url, EPATH_USE_TF='false', TENSORSTORE_GCS_HTTP_URL=url,
    GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', JAX_PLATFORMS='cpu',
  )  # fmt: skip
  return env


def list_objects(url: str, bucket: str, prefix: str) -> dict[str, int]:
  """{object name: size} under ``prefix``."""
  q = urllib.parse.urlencode({'prefix': prefix})
  with urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o?{q}') as r:
    return {o['name']: int(o['size']) for o in json.load(r).get('items', [])}


def download(url: str, bucket: str, name: str, dst: str) -> str:
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media') as r:
    with open(dst, 'wb') as f:
      f.write(r.read())
  return dst


def upload(url: str, bucket: str, src: str, name: str) -> str:
  """Puts local file ``src`` at gs://bucket/name; returns that URI."""
  q = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
  with open(src, 'rb') as f:
    req = urllib.request.Request(
      f'{url}/upload/storage/v1/b/{bucket}/o?{q}', data=f.read(), method='POST'
    )
  urllib.request.urlopen(req).close()
  return f'gs://{bucket}/{name}'
