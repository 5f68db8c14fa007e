"""gcp-storage-emulator with the object generations Cloud Storage reports and honours.

  python tests/gcs_emulator.py --port=PORT --bucket=NAME

Runs the emulator (in memory, on 127.0.0.1) with two things of the real service it lacks
(gcp-storage-emulator 2026.7.19), which TensorStore's GCS driver relies on for Orbax's OCDBT
checkpoints (it rewrites `manifest.ocdbt` under a generation precondition):
- a download answers with the `x-goog-generation` and `x-goog-metageneration` headers;
- the generation preconditions `ifGenerationMatch` (0: the object must not exist) and
  `ifGenerationNotMatch` are honoured on downloads (412 / 304), uploads and deletes (412).
Everything else is the emulator's own code; the clients under test (gcsfs,
google-cloud-storage, TensorStore, google-cloud-cpp) talk HTTP to it unchanged.
"""

import argparse
import logging
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket, name):
  """The object's generation as an int, or 0 when it does not exist."""
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return 0


def _query(request, key):
  v = request.query.get(key)
  return int(v[0]) if v else None


def _precondition_failed(request, current) -> bool:
  """Whether `ifGenerationMatch` of the request rules out `current` (0: absent)."""
  want = _query(request, 'ifGenerationMatch')
  return want is not None and want != current


def _object_name(request):
  if 'object_id' in request.params:
    return request.params['object_id']
  if request.query.get('name'):
    return request.query['name'][0]
  data = request.data
  if isinstance(data, dict) and isinstance(data.get('meta'), dict):
    return data['meta'].get('name')
  return None


def _wrap_download(original):
  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params['bucket_name'], request.params['object_id']
    current = _generation(storage, bucket, name)
    if current and _precondition_failed(request, current):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    not_match = _query(request, 'ifGenerationNotMatch')
    if current and not_match is not None and not_match == current:
      response.status = HTTPStatus.NOT_MODIFIED
      response['x-goog-generation'] = str(current)
      return None
    result = original(request, response, storage, *args, **kwargs)
    if current:
      obj = storage.get_file_obj(bucket, name)
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    return result
  return download


def _wrap_write(original):
  def write(request, response, storage, *args, **kwargs):
    name = _object_name(request)
    if name is not None and _query(request, 'ifGenerationMatch') is not None:
      current = _generation(storage, request.params['bucket_name'], name)
      if _precondition_failed(request, current):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
    return original(request, response, storage, *args, **kwargs)
  return write


def _patch():
  """Swaps the wrapped handlers into the emulator's routing tables (and the module, for the
  handlers that call each other by name)."""
  wrapped = {objects.download: _wrap_download(objects.download),
             objects.insert: _wrap_write(objects.insert),
             objects.delete: _wrap_write(objects.delete)}
  for name in ('download', 'insert', 'delete'):
    setattr(objects, name, wrapped[getattr(objects, name)])
  for _, table in server.HANDLERS:
    for method, handler in list(table.items()):
      if handler in wrapped:
        table[method] = wrapped[handler]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--bucket', required=True)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  _patch()
  srv = server.create_server('127.0.0.1', args.port, in_memory=True, default_bucket=args.bucket)
  srv.start()
  print(f'serving gs://{args.bucket} on 127.0.0.1:{args.port}', flush=True)
  while True:
    time.sleep(3600)


if __name__ == '__main__':
  main()
