"""A fake Google Cloud Storage server on 127.0.0.1 for the gs:// workdir tests:
`python tests/fake_gcs.py PORT BUCKET` (gcp-storage-emulator, in memory).

The emulator leaves out the `x-goog-generation` header of object reads, which tensorstore's
conditional writes (orbax's OCDBT manifest) need; it is added here.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


def _with_generation(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # no such object: the handler answers 404
            pass
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def main(port: int, bucket: str) -> None:
    patched = {h: _with_generation(h) for h in (objects.download, objects.get)}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in patched:
                handlers[method] = patched[handler]
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
